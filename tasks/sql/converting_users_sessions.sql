-- Usable sessions of users with a usable conversion: every journey is drawn from
-- these, whatever the look-back window or tie rule.
SELECT
    s.session_id,
    s.user_id,
    s.ts,
    s.event_day,
    s.channel_name,
    s.holder_engagement,
    s.closer_engagement,
    s.impression_interaction
FROM staged_sessions AS s
SEMI JOIN (
    SELECT DISTINCT user_id FROM staged_conversions WHERE invalid_reason IS NULL
) AS u ON u.user_id = s.user_id
WHERE s.invalid_reason IS NULL
ORDER BY s.user_id, s.ts, s.session_id;
