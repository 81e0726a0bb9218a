"""DuckDB attached to the challenge SQLite file: the one access path for reads and writes."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import IO
from urllib.parse import quote

import duckdb
import duckdb_extension_sqlite_scanner
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from config.errors import DatabaseError, RunLockedError
from config.settings import DatabaseSettings, Settings
from flows.runs import LockHolder, crash_abandoned_run, run_logger

SOURCE_ALIAS = "src"
SQL_DIR = Path(__file__).parent / "sql"

SOURCE_COLUMNS: dict[str, tuple[str, ...]] = {
    "session_sources": (
        "session_id",
        "user_id",
        "event_date",
        "event_time",
        "channel_name",
        "holder_engagement",
        "closer_engagement",
        "impression_interaction",
    ),
    "session_costs": ("session_id", "cost"),
    "conversions": ("conv_id", "user_id", "conv_date", "conv_time", "revenue"),
}
OUTPUT_COLUMNS: dict[str, tuple[str, ...]] = {
    "attribution_customer_journey": ("conv_id", "session_id", "ihc"),
    "channel_reporting": ("channel_name", "date", "cost", "ihc", "ihc_revenue"),
}

_SQLITE_MAGIC = b"SQLite format 3\x00"


@cache
def sql(name: str) -> str:
    """The text of ``tasks/sql/<name>.sql``."""
    return (SQL_DIR / f"{name}.sql").read_text(encoding="utf-8")


def sqlite_extension_path() -> Path:
    """The SQLite scanner shipped by the pinned PyPI package (never downloaded)."""
    package_dir = Path(duckdb_extension_sqlite_scanner.__file__).parent
    version = duckdb.__version__
    candidate = package_dir / "extensions" / f"v{version}" / "sqlite_scanner.duckdb_extension"
    if candidate.is_file():
        return candidate
    found = sorted(package_dir.glob("extensions/*/sqlite_scanner.duckdb_extension"))
    if not found:
        raise DatabaseError(
            "the DuckDB SQLite extension is missing: install "
            f"duckdb-extension-sqlite-scanner=={version}"
        )
    return found[-1]


def check_sqlite_file(path: Path) -> None:
    """Fail with a clear message when ``path`` is missing or not an SQLite database."""
    if not path.exists():
        raise DatabaseError(f"database file not found: {path}")
    if not path.is_file():
        raise DatabaseError(f"database path is not a file: {path}")
    with path.open("rb") as handle:
        header = handle.read(len(_SQLITE_MAGIC))
    if header != _SQLITE_MAGIC:
        raise DatabaseError(f"{path} is not an SQLite database (its header is not SQLite's)")


def connect(
    db_path: Path, *, read_only: bool = False, database: DatabaseSettings | None = None
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with ``db_path`` attached as ``src`` (TYPE sqlite).

    With ``database`` settings, DuckDB's memory is capped at ``memory_limit``; past it,
    large operators spill to the run's folder under ``temp_dir`` (``scratch_directory``).
    """
    check_sqlite_file(db_path)
    config: dict[str, str | bool | int] = {
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "threads": max(os.cpu_count() or 1, 1),
        "preserve_insertion_order": False,
    }
    if database is not None:
        config["memory_limit"] = database.memory_limit
        config["temp_directory"] = str(database.temp_dir / f"run-{os.getpid()}")
    con = duckdb.connect(config=config)
    con.execute("SET enable_progress_bar = false")  # it would draw on the terminal
    try:
        con.load_extension(str(sqlite_extension_path()))
        mode = ", READ_ONLY" if read_only else ""
        # ATTACH takes no bound parameters: the path goes in as a quoted literal.
        literal = "'" + str(db_path).replace("'", "''") + "'"
        con.execute(f"ATTACH {literal} AS {SOURCE_ALIAS} (TYPE sqlite{mode})")
    except duckdb.Error as exc:
        con.close()
        raise DatabaseError(f"cannot open {db_path} as SQLite: {exc}") from exc
    return con


@contextmanager
def scratch_directory(database: DatabaseSettings) -> Iterator[Path]:
    """The run's folder for DuckDB's spilled data, removed when the run ends."""
    folder = database.temp_dir / f"run-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sqlite_reader(db_path: Path) -> sqlite3.Connection:
    """A read-only stdlib connection: SQLite itself, for lookups an index can serve."""
    check_sqlite_file(db_path)
    reader = sqlite3.connect(f"file:{quote(str(db_path))}?mode=ro", uri=True, timeout=30)
    # Pages read through the OS's cache instead of copies in SQLite's: lookups a fifth faster.
    reader.execute("PRAGMA mmap_size = 1073741824")
    return reader


@contextmanager
def run_lock(db_path: Path, timeout_s: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on ``<db>.lock`` so two runs never write one database.

    The file names the holder (flow run, process id) while it holds the lock and is
    emptied when it lets go. The OS releases the lock of a process that dies, killed or
    not, but nobody empties the file: a holder named there when the lock is taken died
    holding it, and its flow run is set Crashed if it still shows as running
    (``flows.runs.crash_abandoned_run``).
    """
    lock_path = db_path.with_name(db_path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = lock_path.open("a+")
    started = time.monotonic()
    waited = locked = False
    try:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                if time.monotonic() >= started + timeout_s:
                    raise RunLockedError(
                        f"another attribution run is using {db_path} (lock {lock_path}); "
                        "wait for it to finish or raise database.lock_timeout_s"
                    ) from None
                if not waited:
                    holder = _lock_holder(handle)
                    run_logger().info(
                        "%s is using %s: waiting up to %g s for it (database.lock_timeout_s)",
                        holder.describe() if holder else "another run",
                        db_path,
                        timeout_s,
                    )
                    waited = True
                time.sleep(0.2)
        if waited:
            run_logger().info(
                "Took the lock on %s after %.1f s", db_path, time.monotonic() - started
            )
        abandoned = _lock_holder(handle)
        holder = LockHolder.this_process()
        _name_lock_holder(handle, holder.dumps())
        if abandoned is not None:
            crash_abandoned_run(abandoned, found_by=holder, db=db_path)
        yield
    finally:
        if locked:
            _name_lock_holder(handle, "")
        handle.close()


def _lock_holder(handle: IO[str]) -> LockHolder | None:
    handle.seek(0)
    return LockHolder.parse(handle.read())


def _name_lock_holder(handle: IO[str], text: str) -> None:
    handle.truncate(0)  # "a+": the next write goes to the end, now the start
    handle.write(text)
    handle.flush()


def _table_columns(con: sqlite3.Connection) -> dict[str, set[str]]:
    tables: dict[str, set[str]] = {}
    names = con.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")
    for (name,) in names.fetchall():
        info = con.execute("SELECT name FROM pragma_table_info(?)", [name]).fetchall()
        tables[name.lower()] = {column.lower() for (column,) in info}
    return tables


def _missing(tables: dict[str, set[str]], expected: dict[str, tuple[str, ...]]) -> list[str]:
    problems = []
    for table, columns in expected.items():
        if table not in tables:
            problems.append(f"table {table!r} is missing")
            continue
        missing = [c for c in columns if c not in tables[table]]
        if missing:
            problems.append(f"table {table!r} lacks column(s) {', '.join(map(repr, missing))}")
    return problems


def prepare_database(db_path: Path, schema_path: Path) -> list[str]:
    """Validate the source schema, create the missing output tables and the indexes the
    reads need (``IF NOT EXISTS``: once per database).

    Runs before DuckDB attaches the file, on a short-lived stdlib connection, so the
    output tables get the schema file's DDL verbatim (DuckDB would rewrite the types).
    Returns what it created. Source rows are never dropped or changed.
    """
    check_sqlite_file(db_path)
    statements = create_table_statements(schema_path)
    con = sqlite3.connect(db_path, timeout=30)
    try:
        tables = _table_columns(con)
        problems = _missing(tables, SOURCE_COLUMNS)
        problems += _missing(
            {t: c for t, c in tables.items() if t in OUTPUT_COLUMNS},
            {t: c for t, c in OUTPUT_COLUMNS.items() if t in tables},
        )
        if problems:
            raise DatabaseError(f"{db_path}: " + "; ".join(problems))
        to_create = [t for t in OUTPUT_COLUMNS if t not in tables]
        absent = [t for t in to_create if t not in statements]
        if absent:
            raise DatabaseError(
                f"schema file {schema_path} has no CREATE TABLE for {', '.join(absent)}"
            )
        indexes = [column for column in _INDEXES if _index_missing(con, column)]
        with con:
            for table in to_create:
                con.execute(statements[table])
            for column in indexes:
                # Names from the constant above, never from input.
                con.execute(f"CREATE INDEX {_INDEXES[column]} ON session_sources ({column})")
        created = [f"table {table}" for table in to_create]
        return created + [f"index {_INDEXES[column]}" for column in indexes]
    except sqlite3.DatabaseError as exc:
        raise DatabaseError(f"cannot read {db_path} as SQLite: {exc}") from exc
    finally:
        con.close()


# The journeys' sessions are looked up by user, the report's by session id (the challenge
# schema's primary key serves that when the table has one): column -> index name.
_INDEXES = {
    "user_id": "idx_session_sources_user_id",
    "session_id": "idx_session_sources_session_id",
}


def table_indexes(con: sqlite3.Connection, table: str) -> list[tuple[bool, tuple[str, ...]]]:
    """(unique, its columns in order) of each index of ``table``, keys' indexes included."""
    indexes = con.execute('SELECT name, "unique" FROM pragma_index_list(?)', [table]).fetchall()
    info = "SELECT name FROM pragma_index_info(?) ORDER BY seqno"
    return [
        (bool(unique), tuple(column for (column,) in con.execute(info, [name])))
        for name, unique in indexes
    ]


def _index_missing(con: sqlite3.Connection, column: str) -> bool:
    """Whether no index of session_sources starts with ``column``."""
    return all(columns[:1] != (column,) for _, columns in table_indexes(con, "session_sources"))


_HEADER_BLOCK = re.compile(r'("""|\'\'\').*?\1', re.DOTALL)
_CREATE_TABLE = re.compile(
    r"^\s*CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?[\"`\[]?(\w+)[\"`\]]?\s*\(",
    re.IGNORECASE,
)


def create_table_statements(schema_path: Path) -> dict[str, str]:
    """The CREATE TABLE statements of a schema file, by table name.

    Accepts the challenge's original file, which starts with a Python-style header
    (``# -*- coding…`` and a docstring) that SQLite rejects, as well as a clean one.
    Only CREATE TABLE statements are returned: the file's DROP statements never run.
    """
    if not schema_path.is_file():
        raise DatabaseError(f"schema file not found: {schema_path}")
    text = _HEADER_BLOCK.sub("", schema_path.read_text(encoding="utf-8"))
    lines = [
        line
        for line in text.splitlines()
        if not line.lstrip().startswith("#") and not line.lstrip().startswith("--")
    ]
    statements: dict[str, str] = {}
    for statement in "\n".join(lines).split(";"):
        match = _CREATE_TABLE.match(statement)
        if match:
            statements[match.group(1).lower()] = statement.strip()
    return statements


def ensure_database(settings: Settings, *, explicit: bool) -> bool:
    """Create sample data when the configured database is missing; whether the database
    holds synthetic sample data (made now or by an earlier run), said loudly each run.

    A path given explicitly (``--db``, the ``db_path`` parameter) must exist: a typo
    there should fail, not quietly produce a report on synthetic data.
    """
    from tasks.sample_data import generate_sample_database, is_synthetic

    db = settings.database.path
    if db.exists():
        check_sqlite_file(db)
        if is_synthetic(db):
            get_run_logger().warning(
                "The database at %s holds SYNTHETIC sample data (made by tasks.sample_data): "
                "the report below is NOT based on real data.",
                db,
            )
            return True
        return False
    if explicit:
        raise DatabaseError(f"database file not found: {db} (no sample data is made for it)")
    sample = settings.sample_data
    get_run_logger().warning(
        "No database at %s: generating SYNTHETIC sample data (scale %s, seed %s). "
        "The report below is NOT based on real data.",
        db,
        sample.scale,
        sample.seed,
    )
    generate_sample_database(db, scale=sample.scale, seed=sample.seed)
    return True


@task(name="prepare-database", cache_policy=NO_CACHE)
def prepare_database_task(db_path: Path, schema_path: Path) -> list[str]:
    started = time.perf_counter()
    created = prepare_database(db_path, schema_path)
    if created:
        get_run_logger().info(
            "Created in %s (once; source rows are not changed): %s (%.1f s)",
            db_path,
            ", ".join(created),
            time.perf_counter() - started,
        )
    return created
