-- One pass over every session and every cost, nothing materialised: spend per channel
-- and day of the usable sessions (each session once, never per journey), and how many
-- rows of each table are unusable, by reason. Ids are unique on both sides once
-- duplicates are kept out of the join, so each row is counted exactly once.
SELECT
    s.channel_name,
    s.event_day,
    s.invalid_reason AS session_reason,
    CASE
        WHEN c.invalid_reason IS NOT NULL THEN c.invalid_reason
        WHEN c.present AND s.present IS NULL AND NOT c.session_duplicated
            THEN 'cost without a session in session_sources'
    END AS cost_reason,
    count(s.present) AS sessions,
    count(c.present) AS costs,
    -- DECIMAL sums are exact: the same data gives the same report, whatever the threads.
    CAST(coalesce(sum(CAST(c.cost AS DECIMAL(38, 9))), 0) AS DOUBLE) AS cost
FROM (SELECT *, true AS present FROM checked_sessions) AS s
FULL JOIN (SELECT *, true AS present FROM checked_costs) AS c ON c.join_key = s.join_key
GROUP BY ALL;
