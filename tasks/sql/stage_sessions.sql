-- Every row of session_sources with its parsed timestamp and, where it cannot be
-- used, the first reason why (NULL = usable). Read with sqlite_all_varchar so that
-- values of the wrong storage class are reported instead of failing the scan.
CREATE OR REPLACE TEMP TABLE staged_sessions AS
WITH raw AS (
    SELECT
        s.session_id,
        s.user_id,
        s.event_date,
        s.event_time,
        s.channel_name,
        s.holder_engagement,
        s.closer_engagement,
        s.impression_interaction,
        c.cost AS cost_text,
        c.cost_rows,
        try_strptime(trim(s.event_date) || ' ' || trim(s.event_time), '%Y-%m-%d %H:%M:%S') AS ts,
        try_cast(s.holder_engagement AS DOUBLE) AS h,
        try_cast(s.closer_engagement AS DOUBLE) AS cl,
        try_cast(s.impression_interaction AS DOUBLE) AS m,
        try_cast(c.cost AS DOUBLE) AS cost,
        count(*) OVER (PARTITION BY s.session_id) AS id_rows
    FROM src.session_sources AS s
    LEFT JOIN (
        SELECT session_id, min(cost) AS cost, count(*) AS cost_rows
        FROM src.session_costs
        GROUP BY session_id
    ) AS c ON c.session_id = s.session_id
),
checked AS (
    SELECT
        *,
        CASE
            WHEN session_id IS NULL OR trim(session_id) = '' THEN 'missing session_id'
            WHEN id_rows > 1 THEN 'duplicate session_id'
            WHEN user_id IS NULL OR trim(user_id) = '' THEN 'missing user_id'
            WHEN ts IS NULL THEN 'unparsable event_date/event_time'
            WHEN channel_name IS NULL OR trim(channel_name) = '' THEN 'empty channel_name'
            WHEN h IS NULL OR h NOT IN (0, 1) THEN 'holder_engagement not 0/1'
            WHEN cl IS NULL OR cl NOT IN (0, 1) THEN 'closer_engagement not 0/1'
            WHEN m IS NULL OR m NOT IN (0, 1) THEN 'impression_interaction not 0/1'
            WHEN cost_rows > 1 THEN 'duplicate session_id in session_costs'
            WHEN cost_text IS NOT NULL AND cost IS NULL THEN 'unparsable cost'
            WHEN isinf(cost) OR isnan(cost) THEN 'non-finite cost'
            WHEN cost < 0 THEN 'negative cost'
        END AS invalid_reason
    FROM raw
)
-- Raw text is kept only for unusable rows: it is what the quarantine file shows.
SELECT
    session_id,
    user_id,
    ts,
    CAST(ts AS DATE) AS event_day,
    channel_name,
    CAST(h AS TINYINT) AS holder_engagement,
    CAST(cl AS TINYINT) AS closer_engagement,
    CAST(m AS TINYINT) AS impression_interaction,
    cost,
    invalid_reason,
    CASE WHEN invalid_reason IS NOT NULL THEN event_date END AS raw_event_date,
    CASE WHEN invalid_reason IS NOT NULL THEN event_time END AS raw_event_time,
    CASE WHEN invalid_reason IS NOT NULL THEN holder_engagement END AS raw_holder_engagement,
    CASE WHEN invalid_reason IS NOT NULL THEN closer_engagement END AS raw_closer_engagement,
    CASE WHEN invalid_reason IS NOT NULL THEN impression_interaction END
        AS raw_impression_interaction,
    CASE WHEN invalid_reason IS NOT NULL THEN cost_text END AS raw_cost
FROM checked;
