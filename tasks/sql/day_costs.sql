-- Marketing spend per channel and day of the usable sessions (with no usable cost: 0),
-- from the aggregate pass (spend_and_checks.sql).
SELECT
    channel_name,
    event_day AS date,
    coalesce(sum(cost) FILTER (WHERE cost_reason IS NULL), 0.0) AS cost
FROM spend_pass
WHERE session_reason IS NULL AND sessions > 0
GROUP BY ALL
ORDER BY channel_name, date;
