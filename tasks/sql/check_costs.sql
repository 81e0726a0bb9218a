-- Every row of session_costs with its value and the first reason it cannot be counted as
-- spend (NULL = usable, as far as the row itself tells; a cost whose session does not
-- exist is found by the spend pass). A duplicated session_id joins no session
-- (join_key NULL, as in check_sessions.sql).
CREATE OR REPLACE TEMP VIEW checked_costs AS
WITH parsed AS (
    SELECT
        CAST(c.session_id AS VARCHAR) AS session_id,
        c.cost AS raw_cost,
        try_cast(c.cost AS DOUBLE) AS cost,
        d.session_id IS NOT NULL AS duplicated,
        -- Such a session exists, so its cost is no orphan (and no spend either).
        ds.session_id IS NOT NULL AS session_duplicated
    FROM cost_rows AS c
    LEFT JOIN duplicated_costs AS d ON d.session_id = CAST(c.session_id AS VARCHAR)
    LEFT JOIN duplicated_sessions AS ds ON ds.session_id = CAST(c.session_id AS VARCHAR)
)
SELECT
    session_id,
    CASE WHEN NOT duplicated THEN md5_number(session_id) END AS join_key,
    cost,
    session_duplicated,
    CASE
        WHEN session_id IS NULL THEN 'missing session_id'
        WHEN duplicated THEN 'duplicate session_id in session_costs'
        WHEN raw_cost IS NOT NULL AND cost IS NULL THEN 'unparsable cost'
        WHEN isinf(cost) OR isnan(cost) THEN 'non-finite cost'
        WHEN cost < 0 THEN 'negative cost'
    END AS invalid_reason,
    raw_cost
FROM parsed;
