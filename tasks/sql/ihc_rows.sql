-- The attribution rows of the comparison's conversions (the ihc model's input).
SELECT
    CAST(a.conv_id AS VARCHAR) AS conversion_id,
    CAST(a.session_id AS VARCHAR) AS session_id,
    a.ihc
FROM src.attribution_customer_journey AS a
SEMI JOIN compared_conversions AS c ON c.conversion_id = CAST(a.conv_id AS VARCHAR);
