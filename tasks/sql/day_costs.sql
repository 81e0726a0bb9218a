-- Marketing spend per channel and day over every usable session, each counted once.
SELECT
    channel_name,
    event_day AS date,
    coalesce(sum(cost), 0.0) AS cost
FROM staged_sessions
WHERE invalid_reason IS NULL
GROUP BY channel_name, event_day
ORDER BY channel_name, date;
