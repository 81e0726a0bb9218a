-- The SQLite extension has no upsert: the whole table is replaced, in the transaction.
DELETE FROM src.channel_reporting;
INSERT INTO src.channel_reporting (channel_name, date, cost, ihc, ihc_revenue)
SELECT channel_name, date, cost, ihc, ihc_revenue FROM new_channel_report
ORDER BY channel_name, date;
