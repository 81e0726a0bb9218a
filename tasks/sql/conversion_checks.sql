-- Unusable conversions per reason.
SELECT 'conversions' AS source_table, invalid_reason AS reason, count(*) AS rows
FROM staged_conversions
WHERE invalid_reason IS NOT NULL
GROUP BY ALL;
