"""Hand-built challenge databases with known answers; the IHC server in its own process."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from config.settings import PROJECT_ROOT as ROOT
from tasks.db import create_table_statements

ORIGINAL_SCHEMA = ROOT / "data" / "challenge_db_create.sql"

Session = tuple[str, str, str, str, str, int, int, int]
Conversion = tuple[str, str, str, str, float]


def build_db(
    path: Path,
    sessions: Iterable[Sequence[object]],
    conversions: Iterable[Sequence[object]],
    costs: Iterable[Sequence[object]] = (),
    *,
    with_keys: bool = True,
) -> Path:
    """A challenge-shaped SQLite file with exactly these rows.

    ``with_keys=False`` creates the source tables without primary keys, as some real
    databases are, so duplicates can exist.
    """
    statements = create_table_statements(ORIGINAL_SCHEMA)
    con = sqlite3.connect(path)
    try:
        for table in ("session_sources", "session_costs", "conversions"):
            ddl = statements[table]
            if not with_keys:
                ddl = ddl.replace("NOT NULL", "").rsplit(",", 1)[0] + "\n)"
            con.execute(ddl)
        con.executemany("INSERT INTO session_sources VALUES (?, ?, ?, ?, ?, ?, ?, ?)", sessions)
        con.executemany("INSERT INTO session_costs VALUES (?, ?)", costs)
        con.executemany("INSERT INTO conversions VALUES (?, ?, ?, ?, ?)", conversions)
        con.commit()
    finally:
        con.close()
    return path


def build_db_missing_columns(path: Path, session_columns: Sequence[str]) -> Path:
    """Source tables whose session_sources has only ``session_columns`` (all text)."""
    con = sqlite3.connect(path)
    try:
        con.execute(f"CREATE TABLE session_sources ({', '.join(session_columns)})")
        con.execute("CREATE TABLE session_costs (session_id TEXT, cost REAL)")
        con.execute(
            "CREATE TABLE conversions (conv_id TEXT, user_id TEXT, conv_date TEXT, "
            "conv_time TEXT, revenue REAL)"
        )
        con.commit()
    finally:
        con.close()
    return path


def table_rows(path: Path, table: str) -> list[tuple]:
    """All rows of ``table`` in storage order, straight from SQLite."""
    con = sqlite3.connect(path)
    try:
        return con.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
    finally:
        con.close()


@contextlib.contextmanager
def ihc_server_process(api_key: str, *options: str) -> Iterator[str]:
    """``python -m tasks.ihc_server`` with these options on a free port, in its own
    process (its CPU and memory are not this process's); yields its base URL.

    The server's polars runs on one thread (unless ``POLARS_MAX_THREADS`` says
    otherwise): it attributes a few requests at a time, and on a machine shared with
    the client a pool of threads waiting for work takes cores from the client (the API
    benchmark at C = 16: +0.8 points of the ideal, two same-process A/B sets).
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "tasks.ihc_server", "--port=0", "--api-key", api_key, *options],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={"POLARS_MAX_THREADS": "1", **os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("IHC server listening on "):
            raise RuntimeError(f"IHC server did not start: {line!r}")
        yield line.split()[-1]
    finally:
        process.kill()
        process.wait(timeout=30)
