-- The usable sessions of session_rows, as the journey builder and the report take them.
SELECT
    session_id,
    user_id,
    ts,
    event_day,
    channel_name,
    holder_engagement,
    closer_engagement,
    impression_interaction
FROM checked_sessions
WHERE invalid_reason IS NULL;
