-- Every row of conversions with its parsed timestamp and the first reason it
-- cannot be used (NULL = usable).
CREATE OR REPLACE TEMP TABLE staged_conversions AS
WITH raw AS (
    SELECT
        conv_id,
        user_id,
        conv_date,
        conv_time,
        revenue AS revenue_text,
        try_strptime(trim(conv_date) || ' ' || trim(conv_time), '%Y-%m-%d %H:%M:%S') AS conv_ts,
        try_cast(revenue AS DOUBLE) AS revenue,
        count(*) OVER (PARTITION BY conv_id) AS id_rows
    FROM src.conversions
),
checked AS (
    SELECT
        *,
        CASE
            WHEN conv_id IS NULL OR trim(conv_id) = '' THEN 'missing conv_id'
            WHEN id_rows > 1 THEN 'duplicate conv_id'
            WHEN user_id IS NULL OR trim(user_id) = '' THEN 'missing user_id'
            WHEN conv_ts IS NULL THEN 'unparsable conv_date/conv_time'
            WHEN revenue IS NULL THEN 'missing or unparsable revenue'
            WHEN isinf(revenue) OR isnan(revenue) THEN 'non-finite revenue'
            WHEN revenue < 0 THEN 'negative revenue'
        END AS invalid_reason
    FROM raw
)
SELECT
    conv_id,
    user_id,
    conv_ts,
    CAST(conv_ts AS DATE) AS conv_day,
    revenue,
    invalid_reason,
    CASE WHEN invalid_reason IS NOT NULL THEN conv_date END AS raw_conv_date,
    CASE WHEN invalid_reason IS NOT NULL THEN conv_time END AS raw_conv_time,
    CASE WHEN invalid_reason IS NOT NULL THEN revenue_text END AS raw_revenue
FROM checked;
