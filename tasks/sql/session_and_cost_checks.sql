-- Unusable session and cost rows per reason, from the aggregate pass.
SELECT 'session_sources' AS source_table, session_reason AS reason, sum(sessions) AS rows
FROM spend_pass
WHERE session_reason IS NOT NULL
GROUP BY ALL
UNION ALL
SELECT 'session_costs' AS source_table, cost_reason AS reason, sum(costs) AS rows
FROM spend_pass
WHERE cost_reason IS NOT NULL
GROUP BY ALL;
