-- (SQLite) The session_sources rows whose :column (user_id or session_id) is one of
-- temp.lookup_keys, found through the index on that column; every value as text, the
-- checks parse them. Rows are fetched in rowid order: the pages are read front to back.
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
WHERE rowid IN (
    SELECT rowid FROM session_sources
    WHERE :column = 'user_id' AND user_id IN (SELECT key FROM temp.lookup_keys)
    UNION ALL
    SELECT rowid FROM session_sources
    WHERE :column = 'session_id' AND session_id IN (SELECT key FROM temp.lookup_keys)
    ORDER BY rowid
);
