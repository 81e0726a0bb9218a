-- Every row of conversions with its parsed timestamp and the first reason it
-- cannot be used (NULL = usable).
CREATE OR REPLACE TEMP TABLE staged_conversions AS
WITH raw AS (
    SELECT
        conv_id,
        user_id,
        conv_date,
        conv_time,
        CAST(revenue AS VARCHAR) AS revenue_text,
        try_strptime(
            trim(CAST(conv_date AS VARCHAR)) || ' ' || trim(CAST(conv_time AS VARCHAR)),
            '%Y-%m-%d %H:%M:%S'
        ) AS conv_ts,
        try_cast(revenue AS DOUBLE) AS revenue,
        count(*) OVER (PARTITION BY conv_id) AS id_rows
    FROM src.conversions
),
checked AS (
    SELECT
        *,
        CASE
            WHEN conv_id IS NULL OR trim(CAST(conv_id AS VARCHAR)) = '' THEN 'missing conv_id'
            WHEN id_rows > 1 THEN 'duplicate conv_id'
            WHEN user_id IS NULL OR trim(CAST(user_id AS VARCHAR)) = '' THEN 'missing user_id'
            WHEN conv_ts IS NULL THEN 'unparsable conv_date/conv_time'
            WHEN revenue IS NULL THEN 'missing or unparsable revenue'
            WHEN isinf(revenue) OR isnan(revenue) THEN 'non-finite revenue'
            WHEN revenue < 0 THEN 'negative revenue'
        END AS invalid_reason
    FROM raw
)
SELECT
    CAST(conv_id AS VARCHAR) AS conv_id,
    CAST(user_id AS VARCHAR) AS user_id,
    conv_ts,
    CAST(conv_ts AS DATE) AS conv_day,
    revenue,
    invalid_reason,
    CASE WHEN invalid_reason IS NOT NULL THEN conv_date END AS raw_conv_date,
    CASE WHEN invalid_reason IS NOT NULL THEN conv_time END AS raw_conv_time,
    CASE WHEN invalid_reason IS NOT NULL THEN revenue_text END AS raw_revenue
FROM checked;
