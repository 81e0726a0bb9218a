-- The reconciliation every run makes before it commits.
SELECT
    (SELECT coalesce(sum(cost), 0.0) FROM new_channel_report) AS report_cost,
    (SELECT coalesce(sum(ihc), 0.0) FROM new_channel_report) AS report_ihc,
    (SELECT coalesce(sum(ihc_revenue), 0.0) FROM new_channel_report) AS report_revenue,
    (SELECT count(DISTINCT conv_id) FROM src.attribution_customer_journey) AS attributed,
    (
        SELECT coalesce(sum(c.revenue), 0.0)
        FROM usable_conversions AS c
        SEMI JOIN src.attribution_customer_journey AS a ON a.conv_id = c.conv_id
    ) AS attributed_revenue,
    (
        SELECT count(*) FROM (
            SELECT conv_id FROM src.attribution_customer_journey
            GROUP BY conv_id
            HAVING abs(sum(ihc) - 1.0) > 1e-6 OR min(ihc) < 0 OR max(ihc) > 1
        )
    ) AS bad_sums,
    (
        SELECT count(*) FROM src.attribution_customer_journey AS a
        ANTI JOIN report_sessions AS s ON s.session_id = a.session_id
    ) AS unknown_sessions,
    (
        SELECT count(*) FROM src.attribution_customer_journey AS a
        ANTI JOIN usable_conversions AS c ON c.conv_id = a.conv_id
    ) AS unknown_conversions;
