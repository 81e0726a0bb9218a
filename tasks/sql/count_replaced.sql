SELECT count(*) FROM src.attribution_customer_journey
WHERE conv_id IN (SELECT conv_id FROM replace_ids);
