-- Every row of session_costs with its value and, where it cannot be counted as spend,
-- the first reason why (NULL = usable). Runs after stage_sessions over all sessions.
CREATE OR REPLACE TEMP TABLE staged_costs AS
WITH raw AS (
    SELECT
        session_id,
        cost AS raw_value,
        try_cast(cost AS DOUBLE) AS cost,
        count(*) OVER (PARTITION BY session_id) AS id_rows
    FROM src.session_costs
),
checked AS (
    SELECT
        raw.*,
        CASE
            WHEN raw.session_id IS NULL THEN 'missing session_id'
            WHEN raw.id_rows > 1 THEN 'duplicate session_id in session_costs'
            WHEN raw.raw_value IS NOT NULL AND raw.cost IS NULL THEN 'unparsable cost'
            WHEN isinf(raw.cost) OR isnan(raw.cost) THEN 'non-finite cost'
            WHEN raw.cost < 0 THEN 'negative cost'
            WHEN s.session_id IS NULL THEN 'cost without a session in session_sources'
        END AS invalid_reason
    FROM raw
    LEFT JOIN (SELECT DISTINCT session_id FROM staged_sessions) AS s
        ON s.session_id = CAST(raw.session_id AS VARCHAR)
)
SELECT
    CAST(session_id AS VARCHAR) AS session_id,
    cost,
    invalid_reason,
    CASE WHEN invalid_reason IS NOT NULL THEN CAST(raw_value AS VARCHAR) END AS raw_cost
FROM checked;
