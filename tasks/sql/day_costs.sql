-- Marketing spend per channel and day over every usable session, each counted once.
-- Summed as DECIMAL: exact, so the same data always gives the same report bytes.
SELECT
    s.channel_name,
    s.event_day AS date,
    CAST(coalesce(sum(CAST(c.cost AS DECIMAL(38, 9))), 0) AS DOUBLE) AS cost
FROM staged_sessions AS s
LEFT JOIN staged_costs AS c ON c.session_id = s.session_id AND c.invalid_reason IS NULL
WHERE s.invalid_reason IS NULL
GROUP BY s.channel_name, s.event_day
ORDER BY s.channel_name, date;
