-- The rows the checks read: here every row of the source tables.
CREATE OR REPLACE TEMP VIEW session_rows AS SELECT * FROM src.session_sources;
CREATE OR REPLACE TEMP VIEW cost_rows AS SELECT * FROM src.session_costs;
