-- session_costs rows whose session is not in session_sources: spend without a
-- channel or day, so it cannot be reported. Listed in the quarantine, never lost.
SELECT
    'session_costs' AS source_table,
    'cost without a session in session_sources' AS reason,
    to_json(map(['session_id', 'raw_cost'], [CAST(c.session_id AS VARCHAR), CAST(c.cost AS VARCHAR)]))
        AS row_values
FROM src.session_costs AS c
ANTI JOIN src.session_sources AS s ON s.session_id = c.session_id
ORDER BY row_values;
