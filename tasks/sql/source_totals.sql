-- Usable sessions and their total spend, summed without grouping: the figure the
-- report's cost column must reconcile to.
SELECT
    (SELECT count(*) FROM staged_sessions WHERE invalid_reason IS NULL) AS sessions,
    (
        SELECT CAST(coalesce(sum(CAST(c.cost AS DECIMAL(38, 9))), 0) AS DOUBLE)
        FROM staged_costs AS c
        SEMI JOIN (
            SELECT session_id FROM staged_sessions WHERE invalid_reason IS NULL
        ) AS s ON s.session_id = c.session_id
        WHERE c.invalid_reason IS NULL
    ) AS total_cost;
