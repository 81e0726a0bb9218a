-- Rows in which the rebuilt report and the stored one differ (0: nothing to rewrite).
WITH stored AS (
    SELECT CAST(channel_name AS VARCHAR) AS channel_name, CAST(date AS VARCHAR) AS date,
           cost, ihc, ihc_revenue
    FROM src.channel_reporting
),
rebuilt AS (SELECT channel_name, date, cost, ihc, ihc_revenue FROM new_channel_report)
SELECT count(*) FROM (
    (SELECT * FROM rebuilt EXCEPT ALL SELECT * FROM stored)
    UNION ALL
    (SELECT * FROM stored EXCEPT ALL SELECT * FROM rebuilt)
);
