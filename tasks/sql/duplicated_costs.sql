-- Session ids found more than once in session_costs (only asked where no unique index
-- rules that out): every copy is unusable.
SELECT CAST(session_id AS VARCHAR) AS session_id
FROM cost_rows
WHERE session_id IS NOT NULL
GROUP BY ALL
HAVING count(*) > 1;
