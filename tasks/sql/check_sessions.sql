-- Every row of session_rows (a view: all of session_sources, or the rows looked up for
-- the run's users) with its parsed values and the first reason it cannot be used
-- (NULL = usable). A session_id in duplicated_sessions is unusable in every copy, since
-- no copy can be trusted over another; its join_key is NULL, so it joins no cost.
-- Blank: NULL, empty or spaces only. The cheap comparison first: trim() allocates, and
-- only a value that sorts before '!' can be blank.
CREATE OR REPLACE TEMP MACRO blank(value) AS value IS NULL OR (value < '!' AND trim(value) = '');

CREATE OR REPLACE TEMP VIEW checked_sessions AS
WITH parsed AS (
    SELECT
        CAST(s.session_id AS VARCHAR) AS session_id,
        CAST(s.user_id AS VARCHAR) AS user_id,
        CAST(s.channel_name AS VARCHAR) AS channel_name,
        -- Trimmed only where the plain value does not parse: trim() allocates.
        coalesce(
            try_strptime(s.event_date || ' ' || s.event_time, '%Y-%m-%d %H:%M:%S'),
            try_strptime(
                trim(CAST(s.event_date AS VARCHAR)) || ' ' || trim(CAST(s.event_time AS VARCHAR)),
                '%Y-%m-%d %H:%M:%S'
            )
        ) AS ts,
        try_cast(s.holder_engagement AS DOUBLE) AS h,
        try_cast(s.closer_engagement AS DOUBLE) AS cl,
        try_cast(s.impression_interaction AS DOUBLE) AS m,
        d.session_id IS NOT NULL AS duplicated,
        s.event_date,
        s.event_time,
        s.holder_engagement,
        s.closer_engagement,
        s.impression_interaction
    FROM session_rows AS s
    LEFT JOIN duplicated_sessions AS d ON d.session_id = CAST(s.session_id AS VARCHAR)
),
checked AS (
    SELECT
        *,
        CASE
            WHEN blank(session_id) THEN 'missing session_id'
            WHEN duplicated THEN 'duplicate session_id'
            WHEN blank(user_id) THEN 'missing user_id'
            WHEN ts IS NULL THEN 'unparsable event_date/event_time'
            WHEN blank(channel_name) THEN 'empty channel_name'
            WHEN h IS NULL OR h NOT IN (0, 1) THEN 'holder_engagement not 0/1'
            WHEN cl IS NULL OR cl NOT IN (0, 1) THEN 'closer_engagement not 0/1'
            WHEN m IS NULL OR m NOT IN (0, 1) THEN 'impression_interaction not 0/1'
        END AS invalid_reason
    FROM parsed
)
SELECT
    session_id,
    -- 128 bits instead of the text: the spend pass's join holds a third of the memory,
    -- and a false match among even 10^8 ids has odds below 10^-22.
    CASE WHEN NOT duplicated THEN md5_number(session_id) END AS join_key,
    user_id,
    ts,
    CAST(ts AS DATE) AS event_day,
    channel_name,
    CAST(h AS TINYINT) AS holder_engagement,
    CAST(cl AS TINYINT) AS closer_engagement,
    CAST(m AS TINYINT) AS impression_interaction,
    invalid_reason,
    -- The raw values, for the quarantine file.
    event_date AS raw_event_date,
    event_time AS raw_event_time,
    holder_engagement AS raw_holder_engagement,
    closer_engagement AS raw_closer_engagement,
    impression_interaction AS raw_impression_interaction
FROM checked;
