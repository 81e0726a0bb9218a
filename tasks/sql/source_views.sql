-- The rows the checks read: every row of the source tables, or, when the spend pass runs
-- in several passes (variables passes / pass, set by tasks/sources.py), the rows of one
-- part: both tables split by a hash of session_id, so a session meets its cost in the
-- same pass and each pass's join fits in memory.
CREATE OR REPLACE TEMP VIEW session_rows AS
SELECT * FROM src.session_sources
WHERE hash(CAST(session_id AS VARCHAR)) % coalesce(getvariable('passes'), 1)
    = coalesce(getvariable('pass'), 0);
CREATE OR REPLACE TEMP VIEW cost_rows AS
SELECT * FROM src.session_costs
WHERE hash(CAST(session_id AS VARCHAR)) % coalesce(getvariable('passes'), 1)
    = coalesce(getvariable('pass'), 0);
