-- channel_reporting from everything attributed so far. Spend comes from all usable
-- sessions of a channel-day (each once, never multiplied by journeys); ihc and
-- ihc_revenue from the attribution rows, via the session's channel and event date.
CREATE OR REPLACE TEMP TABLE new_channel_report AS
WITH attributed AS (
    SELECT
        s.channel_name,
        s.event_day AS date,
        -- DECIMAL sums are exact: a rerun gives the same bytes whatever the thread order.
        CAST(sum(CAST(a.ihc AS DECIMAL(38, 18))) AS DOUBLE) AS ihc,
        CAST(sum(CAST(a.ihc * c.revenue AS DECIMAL(38, 12))) AS DOUBLE) AS ihc_revenue
    FROM src.attribution_customer_journey AS a
    JOIN report_sessions AS s ON s.session_id = a.session_id
    JOIN usable_conversions AS c ON c.conv_id = a.conv_id
    GROUP BY s.channel_name, s.event_day
)
SELECT
    coalesce(d.channel_name, a.channel_name) AS channel_name,
    strftime(coalesce(d.date, a.date), '%Y-%m-%d') AS date,
    coalesce(d.cost, 0.0) AS cost,
    coalesce(a.ihc, 0.0) AS ihc,
    coalesce(a.ihc_revenue, 0.0) AS ihc_revenue
FROM day_costs AS d
FULL OUTER JOIN attributed AS a ON a.channel_name = d.channel_name AND a.date = d.date
ORDER BY channel_name, date;
