INSERT INTO src.attribution_customer_journey (conv_id, session_id, ihc)
SELECT conv_id, session_id, ihc FROM new_rows ORDER BY conv_id, session_id;
