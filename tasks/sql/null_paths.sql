-- The sessions of null paths (shared/spec/models.md): per user, the usable sessions
-- strictly after the user's last usable conversion (all of them for a user who never
-- converted) whose event date lies in the run's range. Sessions after the last
-- conversion belong to no journey, whatever the tie rule or look-back window.
-- Rows come grouped by user only: sorting on one 64-bit key is much cheaper than on the
-- text id, time and session id; the order inside each user is made by the reader.
SELECT hash(s.user_id) AS user_key, s.ts, s.session_id, s.channel_name
FROM checked_sessions AS s
ANTI JOIN null_path_converting_users AS c
    ON c.user_id = s.user_id AND s.ts <= c.last_conversion_ts
WHERE s.invalid_reason IS NULL
    AND ($start_date IS NULL OR s.event_day >= $start_date)
    AND ($end_date IS NULL OR s.event_day <= $end_date)
ORDER BY user_key;
