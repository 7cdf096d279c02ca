"""The database schema, versioned: tables, migrations and the stored forms of traces.

``meta.schema_version`` says which layout a file has. Opening an older file upgrades it in one
transaction through ``MIGRATIONS``; a newer file is refused with a message naming both versions.
Add a migration, never edit a released one, and commit a database of each released schema under
``tests/data/`` for the upgrade tests.

No sqlite-utils or numpy at import: the lookup library reads these constants.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import sqlite_utils

SCHEMA_VERSION = 2
STATUSES = ("ok", "build_error", "wrong_result", "runtime_error", "timeout")
KEY_FIELDS = ("workload_key", "device_id", "partition", "ratio", "interference")


def _migrate_to_1(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        CREATE TABLE workloads (
            key TEXT PRIMARY KEY, op TEXT NOT NULL, dtype TEXT NOT NULL, params TEXT NOT NULL,
            spec_hash TEXT NOT NULL, name TEXT, model TEXT, flops INTEGER, created_at TEXT NOT NULL);
        CREATE TABLE devices (
            id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, uuid TEXT, units INTEGER NOT NULL,
            unit TEXT NOT NULL, driver TEXT, arch TEXT, tvm_version TEXT, created_at TEXT NOT NULL);
        CREATE TABLE measurements (
            id INTEGER PRIMARY KEY,
            workload_key TEXT NOT NULL REFERENCES workloads(key),
            device_id TEXT NOT NULL REFERENCES devices(id),
            partition TEXT NOT NULL, ratio REAL NOT NULL, interference TEXT NOT NULL,
            mod_hash TEXT NOT NULL, trace TEXT NOT NULL,
            status TEXT NOT NULL, error TEXT, times TEXT, median_s REAL, rel_err REAL,
            granted_units INTEGER, granted_share REAL, neighbour_throughput REAL, neighbour_unit TEXT,
            build_s REAL, run_s REAL, search_s REAL, features BLOB, source TEXT, created_at TEXT NOT NULL,
            UNIQUE (workload_key, device_id, partition, ratio, interference, mod_hash));
        CREATE INDEX measurements_by_workload ON measurements (workload_key, device_id);
        CREATE TABLE best (
            workload_key TEXT NOT NULL, device_id TEXT NOT NULL, partition TEXT NOT NULL, ratio REAL NOT NULL,
            interference TEXT NOT NULL, measurement_id INTEGER NOT NULL REFERENCES measurements(id),
            median_s REAL NOT NULL, n_trials INTEGER NOT NULL, updated_at TEXT NOT NULL,
            PRIMARY KEY (workload_key, device_id, partition, ratio, interference));
        CREATE TABLE cost_models (
            device_id TEXT NOT NULL, partition TEXT NOT NULL, ratio REAL NOT NULL, interference TEXT NOT NULL,
            kind TEXT NOT NULL, model TEXT NOT NULL, n_samples INTEGER NOT NULL, updated_at TEXT NOT NULL,
            PRIMARY KEY (device_id, partition, ratio, interference));
        CREATE TABLE baselines (
            workload_key TEXT NOT NULL, device_id TEXT NOT NULL, partition TEXT NOT NULL, ratio REAL NOT NULL,
            interference TEXT NOT NULL, kind TEXT NOT NULL, median_s REAL NOT NULL, granted_units INTEGER,
            created_at TEXT NOT NULL,
            PRIMARY KEY (workload_key, device_id, partition, ratio, interference, kind));
        """
    )


def encode_trace(trace: str) -> bytes:
    """Traces are stored zlib-compressed (a MetaSchedule trace is ~19 KB of JSON, ~2.7 KB packed)."""
    return zlib.compress(trace.encode(), 6)


def decode_trace(stored: bytes | str | None) -> str | None:
    if stored is None or isinstance(stored, str):
        return stored
    return zlib.decompress(stored).decode()


def _migrate_to_2(db: sqlite_utils.Database) -> None:
    # v2: `measurements.trace` holds zlib-compressed bytes instead of text (7x smaller files).
    rows = db.execute("SELECT id, trace FROM measurements WHERE typeof(trace) = 'text'").fetchall()
    db.conn.executemany("UPDATE measurements SET trace = ? WHERE id = ?", [(encode_trace(t), i) for i, t in rows])


MIGRATIONS: dict[int, Callable[["sqlite_utils.Database"], None]] = {1: _migrate_to_1, 2: _migrate_to_2}
