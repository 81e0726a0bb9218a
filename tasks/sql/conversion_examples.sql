-- Up to $1 unusable conversions per reason, with their raw values, for quarantine.csv.
SELECT
    'conversions' AS source_table,
    invalid_reason AS reason,
    CAST(to_json(struct_pack(
        conv_id := conv_id,
        user_id := user_id,
        raw_conv_date := CAST(raw_conv_date AS VARCHAR),
        raw_conv_time := CAST(raw_conv_time AS VARCHAR),
        raw_revenue := CAST(raw_revenue AS VARCHAR)
    )) AS VARCHAR) AS row_values
FROM staged_conversions
WHERE invalid_reason IS NOT NULL
QUALIFY row_number() OVER (PARTITION BY invalid_reason ORDER BY conv_id, raw_conv_date) <= $1
ORDER BY reason, row_values;
