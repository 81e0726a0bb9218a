-- Every row of session_rows (a view on session_sources: all of it, or the sessions of
-- converting users) with its parsed timestamp and, where it cannot be used, the first
-- reason why (NULL = usable). The duplicate check reads only session_id, so the wide
-- rows are read from SQLite once and never held twice.
CREATE OR REPLACE TEMP TABLE staged_sessions AS
WITH duplicated AS (
    SELECT session_id
    FROM session_rows
    GROUP BY session_id
    HAVING count(*) > 1
),
parsed AS (
    SELECT
        s.*,
        try_strptime(
            trim(CAST(s.event_date AS VARCHAR)) || ' ' || trim(CAST(s.event_time AS VARCHAR)),
            '%Y-%m-%d %H:%M:%S'
        ) AS ts,
        try_cast(s.holder_engagement AS DOUBLE) AS h,
        try_cast(s.closer_engagement AS DOUBLE) AS cl,
        try_cast(s.impression_interaction AS DOUBLE) AS m,
        d.session_id IS NOT NULL AS duplicated
    FROM session_rows AS s
    LEFT JOIN duplicated AS d ON d.session_id = s.session_id
),
checked AS (
    SELECT
        *,
        CASE
            WHEN session_id IS NULL OR trim(CAST(session_id AS VARCHAR)) = ''
                THEN 'missing session_id'
            WHEN duplicated THEN 'duplicate session_id'
            WHEN user_id IS NULL OR trim(CAST(user_id AS VARCHAR)) = '' THEN 'missing user_id'
            WHEN ts IS NULL THEN 'unparsable event_date/event_time'
            WHEN channel_name IS NULL OR trim(CAST(channel_name AS VARCHAR)) = ''
                THEN 'empty channel_name'
            WHEN h IS NULL OR h NOT IN (0, 1) THEN 'holder_engagement not 0/1'
            WHEN cl IS NULL OR cl NOT IN (0, 1) THEN 'closer_engagement not 0/1'
            WHEN m IS NULL OR m NOT IN (0, 1) THEN 'impression_interaction not 0/1'
        END AS invalid_reason
    FROM parsed
)
-- Raw values are kept only for unusable rows: they are what the quarantine file shows.
SELECT
    CAST(session_id AS VARCHAR) AS session_id,
    CAST(user_id AS VARCHAR) AS user_id,
    ts,
    CAST(ts AS DATE) AS event_day,
    CAST(channel_name AS VARCHAR) AS channel_name,
    CAST(h AS TINYINT) AS holder_engagement,
    CAST(cl AS TINYINT) AS closer_engagement,
    CAST(m AS TINYINT) AS impression_interaction,
    invalid_reason,
    CASE WHEN invalid_reason IS NOT NULL THEN CAST(event_date AS VARCHAR) END AS raw_event_date,
    CASE WHEN invalid_reason IS NOT NULL THEN CAST(event_time AS VARCHAR) END AS raw_event_time,
    CASE WHEN invalid_reason IS NOT NULL THEN CAST(holder_engagement AS VARCHAR) END
        AS raw_holder_engagement,
    CASE WHEN invalid_reason IS NOT NULL THEN CAST(closer_engagement AS VARCHAR) END
        AS raw_closer_engagement,
    CASE WHEN invalid_reason IS NOT NULL THEN CAST(impression_interaction AS VARCHAR) END
        AS raw_impression_interaction
FROM checked;

