SELECT conv_id, user_id, conv_ts, conv_day, revenue
FROM staged_conversions
WHERE invalid_reason IS NULL
ORDER BY conv_id;
