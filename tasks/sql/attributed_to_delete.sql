-- Rows of conversions being replaced; the same statement in every run keeps the
-- write idempotent: delete by conv_id, then insert, inside one transaction.
DELETE FROM src.attribution_customer_journey
WHERE conv_id IN (SELECT conv_id FROM replace_ids);
