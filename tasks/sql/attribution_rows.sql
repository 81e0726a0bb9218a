-- Every attribution row written so far: which conversions are done, and which sessions
-- the report needs.
SELECT CAST(conv_id AS VARCHAR) AS conv_id, CAST(session_id AS VARCHAR) AS session_id
FROM src.attribution_customer_journey;
