-- (SQLite) The session_sources rows of the users in temp.lookup_keys, found through the
-- index on user_id; every value as text, the checks parse them.
SELECT
    CAST(session_id AS TEXT),
    CAST(user_id AS TEXT),
    CAST(event_date AS TEXT),
    CAST(event_time AS TEXT),
    CAST(channel_name AS TEXT),
    CAST(holder_engagement AS TEXT),
    CAST(closer_engagement AS TEXT),
    CAST(impression_interaction AS TEXT)
FROM session_sources
-- Rows fetched in rowid order: the table's pages are then read front to back.
WHERE rowid IN (
    SELECT rowid FROM session_sources
    WHERE user_id IN (SELECT key FROM temp.lookup_keys)
    ORDER BY rowid
);
