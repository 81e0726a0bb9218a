-- The rows the checks read: every row of the source tables, or, when the spend pass runs
-- in several passes, the rows of one part ({passes} and {part} are integers filled in by
-- tasks/sources.py; as literals they cost nothing, as parameters or variables the
-- filter slows the scan threefold): both tables are split by a hash of session_id, so
-- a session meets its cost in the same pass and each pass's join fits in memory.
CREATE OR REPLACE TEMP VIEW session_rows AS
SELECT * FROM src.session_sources
WHERE hash(CAST(session_id AS VARCHAR)) % {passes} = {part};
CREATE OR REPLACE TEMP VIEW cost_rows AS
SELECT * FROM src.session_costs
WHERE hash(CAST(session_id AS VARCHAR)) % {passes} = {part};
