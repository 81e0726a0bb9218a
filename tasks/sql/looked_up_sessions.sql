-- The rows the session checks read: here the session_sources rows looked up by index.
CREATE OR REPLACE TEMP VIEW session_rows AS SELECT * FROM looked_up_sessions;
