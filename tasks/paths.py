"""Converting and null paths (``shared/spec/models.md``), aggregated to distinct paths.

Choices where the spec is silent:

- A null path's sessions are read from every session of the database through DuckDB,
  checked by the pipeline's own rules (``check_sessions.sql``), grouped by user there
  (sorted on a hash of user_id) and streamed to polars in batches, which orders each
  user's sessions and counts the paths: memory stays bounded at any scale, as DuckDB
  spills its sort past its memory limit and polars holds one batch and the distinct
  paths. Ordered aggregates in DuckDB (``list(… ORDER BY …)``) are three to five times
  slower and cannot spill; sorting by user, time and session id in DuckDB is 1.7 times
  slower.
- Users are told apart by a 64-bit hash of ``user_id``; two users sharing a hash (odds
  about 1e-7 at 2 million users) would merge into one null path.
- "After the last conversion" is strict: a session at exactly the last conversion's
  timestamp is in no null path (with the "at or before" tie setting it is in a journey).
- Distinct paths come sorted: paths with conversions first, then by channel sequence,
  so the models see the same order whatever the order of their input rows.
"""

from __future__ import annotations

from datetime import date

import duckdb
import polars as pl

from tasks.db import sql

# Rows per batch streamed from DuckDB: a batch and its grouping take ~150 MB per million.
NULL_PATH_BATCH_ROWS = 1_000_000
CONVERTING_USERS_VIEW = "null_path_converting_users"

PATH_TYPE = pl.List(pl.String)


def last_conversion_times(conversions: pl.DataFrame) -> pl.DataFrame:
    """(user_id, last_conversion_ts) of every user with a usable conversion.

    ``conversions`` are the usable conversions (``conv_id, user_id, conv_ts, …``) of the
    whole database, not only the run's range: a session before a later conversion belongs
    to that conversion's journey, never to a null path.
    """
    return conversions.group_by("user_id").agg(last_conversion_ts=pl.col("conv_ts").max())


def _add_paths(counted: pl.DataFrame, sessions: pl.DataFrame) -> pl.DataFrame:
    """``counted`` plus the paths of ``sessions`` (whole users)."""
    # group_by keeps the rows' order inside each group: the sessions' path order.
    paths = (
        sessions.sort("user_key", "ts", "session_id")
        .group_by("user_key")
        .agg(path=pl.col("channel_name"))
        .group_by("path")
        .agg(nulls=pl.len().cast(pl.Int64))
    )
    return pl.concat([counted, paths]).group_by("path").agg(pl.col("nulls").sum())


def null_paths(
    con: duckdb.DuckDBPyConnection,
    *,
    start_date: date | None = None,
    end_date: date | None = None,
    converting_users: pl.DataFrame,
    duplicated_sessions: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Distinct null paths with their counts: ``path`` (channel names), ``nulls``.

    ``con`` has the database attached as ``src`` (``tasks.db.connect``);
    ``converting_users`` is ``(user_id, last_conversion_ts)`` as from
    ``last_conversion_times``; ``duplicated_sessions`` the session ids found twice
    (``tasks.sources.Sources``), unusable. Sessions whose event_date lies outside
    [``start_date``, ``end_date``] (open ends allowed) are left out.
    """
    duplicated = pl.DataFrame(schema={"session_id": pl.String})
    con.register(
        "duplicated_sessions", duplicated if duplicated_sessions is None else duplicated_sessions
    )
    con.execute(sql("source_views").format(passes=1, part=0))
    con.execute(sql("check_sessions"))
    con.register(CONVERTING_USERS_VIEW, converting_users.select("user_id", "last_conversion_ts"))
    counted = pl.DataFrame(schema={"path": PATH_TYPE, "nulls": pl.Int64})
    try:
        reader = con.execute(
            sql("null_paths"), {"start_date": start_date, "end_date": end_date}
        ).to_arrow_reader(NULL_PATH_BATCH_ROWS)
        # The batches cut the sorted rows anywhere: the last user of a batch may go on in
        # the next one, so its rows wait for the next batch.
        pending: pl.DataFrame | None = None
        for batch in reader:
            rows = pl.DataFrame(batch)
            if pending is not None:
                rows = pl.concat([pending, rows])
            is_last_user = pl.col("user_key") == rows["user_key"][-1]
            pending = rows.filter(is_last_user)
            counted = _add_paths(counted, rows.filter(~is_last_user))
        if pending is not None:
            counted = _add_paths(counted, pending)
    finally:
        con.unregister(CONVERTING_USERS_VIEW)
    return counted.sort("path")


def conversion_paths(journeys: pl.DataFrame) -> pl.DataFrame:
    """One row per conversion with a journey: ``conversion_id``, ``path``, ``revenue``.

    ``journeys`` is ``tasks.journeys.build_journeys``'s frame; the path lists its channel
    labels in journey order (timestamp, then session_id).
    """
    return (
        journeys.sort("conversion_id", "timestamp", "session_id")
        .group_by("conversion_id")
        .agg(path=pl.col("channel_label"), revenue=pl.col("revenue").first())
        .sort("conversion_id")
    )


def distinct_paths(conversions: pl.DataFrame, nulls: pl.DataFrame) -> pl.DataFrame:
    """Distinct paths: ``path``, ``conversions``, ``nulls``, ``value`` (revenue).

    ``conversions`` is ``conversion_paths``'s frame, ``nulls`` is ``null_paths``'s. A
    channel sequence seen both as a converting and as a null path is one row with both
    counts. Paths with conversions come first, each part sorted by its channel sequence.
    """
    converting = conversions.group_by("path").agg(
        conversions=pl.len().cast(pl.Int64), value=pl.col("revenue").sum()
    )
    not_converting = nulls.group_by("path").agg(pl.col("nulls").sum().cast(pl.Int64))
    return (
        converting.join(not_converting, on="path", how="full", coalesce=True)
        .with_columns(
            pl.col("conversions", "nulls").fill_null(0),
            pl.col("value").fill_null(0.0),
        )
        .filter(pl.col("path").list.len() > 0)
        .sort(pl.col("conversions") == 0, "path")
        .select(
            pl.col("path").cast(PATH_TYPE),
            "conversions",
            "nulls",
            pl.col("value").cast(pl.Float64),
        )
    )
