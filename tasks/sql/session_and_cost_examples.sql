-- Up to $1 unusable session and cost rows per reason, with their raw values, for
-- quarantine.csv. Read only when the aggregate pass found some.
WITH bad_sessions AS (
    SELECT
        'session_sources' AS source_table,
        invalid_reason AS reason,
        CAST(to_json(struct_pack(
            session_id := session_id,
            user_id := user_id,
            channel_name := channel_name,
            raw_event_date := CAST(raw_event_date AS VARCHAR),
            raw_event_time := CAST(raw_event_time AS VARCHAR),
            raw_holder_engagement := CAST(raw_holder_engagement AS VARCHAR),
            raw_closer_engagement := CAST(raw_closer_engagement AS VARCHAR),
            raw_impression_interaction := CAST(raw_impression_interaction AS VARCHAR)
        )) AS VARCHAR) AS row_values
    FROM checked_sessions
    WHERE invalid_reason IS NOT NULL
),
bad_costs AS (
    SELECT
        'session_costs' AS source_table,
        coalesce(c.invalid_reason, 'cost without a session in session_sources') AS reason,
        CAST(to_json(struct_pack(
            session_id := c.session_id,
            raw_cost := CAST(c.raw_cost AS VARCHAR)
        )) AS VARCHAR) AS row_values
    FROM checked_costs AS c
    WHERE c.invalid_reason IS NOT NULL
        OR NOT EXISTS (
            SELECT 1 FROM session_rows AS s WHERE CAST(s.session_id AS VARCHAR) = c.session_id
        )
)
SELECT *
FROM (SELECT * FROM bad_sessions UNION ALL SELECT * FROM bad_costs)
QUALIFY row_number() OVER (PARTITION BY source_table, reason ORDER BY row_values) <= $1
ORDER BY source_table, reason, row_values;
