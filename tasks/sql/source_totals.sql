-- Total spend of the usable sessions, summed without grouping: the figure the report's
-- cost column must reconcile to.
SELECT CAST(coalesce(sum(CAST(c.cost AS DECIMAL(38, 9))), 0) AS DOUBLE) AS total_cost
FROM staged_costs AS c
SEMI JOIN (
    SELECT session_id FROM staged_sessions WHERE invalid_reason IS NULL
) AS s ON s.session_id = c.session_id
WHERE c.invalid_reason IS NULL;
