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

SCHEMA_VERSION = 4
# ``unchecked``: timed elsewhere (a MetaSchedule record imported) but never run through our output
# check; never a best config, replaced in place by the first checked measurement of the kernel.
STATUSES = ("ok", "build_error", "wrong_result", "runtime_error", "timeout", "unchecked")
KEY_FIELDS = ("workload_key", "device_id", "partition", "ratio", "interference")

# The best config of every key without its trace (traces are ~10 KB each and most readers never
# need them), as store.records.BestIndexRow, then the row's status: one query for the store's
# readers and the lookup's, which reads with plain sqlite3.
BEST_INDEX_SQL = ("SELECT b.workload_key, b.device_id, b.partition, b.ratio, b.interference, b.measurement_id,"
                  " b.median_s, b.n_trials, m.mod_hash, m.granted_units, b.updated_at, m.status"
                  " FROM best b JOIN measurements m ON m.id = b.measurement_id")


def _migrate_to_1(db: sqlite_utils.Database) -> None:
    # Statement by statement: executescript() would commit the caller's transaction first, and with
    # it the lock that keeps two jobs from creating the same file at once.
    _script(
        db, """
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


def granted_ratio(granted_units: int, total: int) -> float:
    """The key ratio of an exact share (core set, green context): its units over the device's."""
    return 100.0 if granted_units >= total else round(100.0 * granted_units / total, 4)


def _migrate_to_3(db: "sqlite_utils.Database") -> None:
    # v3: devices record the LLVM features turned off for the host (mattr); measurements of core
    # sets and green contexts are keyed by the share they were granted, not the percentage asked
    # (25 % of 2 cores is 1 core, the same condition as 50 %; a 32-SM green context is 24.2424 %
    # however it was asked for). A kernel measured under both old keys keeps its first measurement.
    db.execute("ALTER TABLE devices ADD COLUMN mattr TEXT")
    rows = db.execute(
        "SELECT m.id, m.ratio, m.granted_units, d.units FROM measurements m JOIN devices d ON d.id = m.device_id"
        " WHERE m.partition IN ('cpu', 'green') AND m.granted_units IS NOT NULL ORDER BY m.id").fetchall()
    moves = [(mid, granted_ratio(units, total)) for mid, ratio, units, total in rows
             if granted_ratio(units, total) != ratio]
    if moves:  # best rows point at measurements: rebuilt below from what is left
        db.execute("DELETE FROM best")
    for mid, new in moves:
        clash = db.execute(
            "SELECT o.id FROM measurements o JOIN measurements m ON o.workload_key = m.workload_key AND"
            " o.device_id = m.device_id AND o.partition = m.partition AND o.interference = m.interference AND"
            " o.mod_hash = m.mod_hash WHERE m.id = ? AND o.ratio = ?", [mid, new]).fetchone()
        if clash and clash[0] < mid:
            db.execute("DELETE FROM measurements WHERE id = ?", [mid])
            continue
        if clash:  # the row already under the new key was measured later: this one stands
            db.execute("DELETE FROM measurements WHERE id = ?", [clash[0]])
        db.execute("UPDATE measurements SET ratio = ? WHERE id = ?", [new, mid])
    for rowid, ratio, units, total in db.execute(
            "SELECT b.rowid, b.ratio, b.granted_units, d.units FROM baselines b JOIN devices d ON d.id = b.device_id"
            " WHERE b.partition IN ('cpu', 'green') AND b.granted_units IS NOT NULL").fetchall():
        new = granted_ratio(units, total)
        if new != ratio:
            db.execute("UPDATE OR IGNORE baselines SET ratio = ? WHERE rowid = ?", [new, rowid])
            db.execute("DELETE FROM baselines WHERE rowid = ? AND ratio = ?", [rowid, ratio])
    if moves:  # the best rows and the models of the merged keys are rebuilt from the measurements
        db.execute(
            "INSERT INTO best (workload_key, device_id, partition, ratio, interference, measurement_id, median_s,"
            " n_trials, updated_at)"
            " SELECT workload_key, device_id, partition, ratio, interference,"
            " (SELECT id FROM measurements x WHERE x.workload_key = g.workload_key AND x.device_id = g.device_id AND"
            "  x.partition = g.partition AND x.ratio = g.ratio AND x.interference = g.interference AND"
            "  x.status = 'ok' ORDER BY x.median_s, x.id LIMIT 1),"
            " (SELECT MIN(median_s) FROM measurements x WHERE x.workload_key = g.workload_key AND"
            "  x.device_id = g.device_id AND x.partition = g.partition AND x.ratio = g.ratio AND"
            "  x.interference = g.interference AND x.status = 'ok'),"
            " COUNT(*), strftime('%Y-%m-%dT%H:%M:%SZ', 'now')"
            " FROM measurements g GROUP BY workload_key, device_id, partition, ratio, interference"
            " HAVING SUM(status = 'ok') > 0")
        db.execute("DELETE FROM cost_models WHERE partition IN ('cpu', 'green')")


def _migrate_to_4(db: "sqlite_utils.Database") -> None:
    # v4: workloads may be PrimFuncs from a model (op 'prim'): `prim` holds the task as JSON (its
    # TVMScript, structural hash, parameter shapes and dtypes, outputs, FLOPs); NULL for operators.
    # `model_runs`: end-to-end latencies of whole models per share (spatialtune model), one row per
    # (run, variant): share-tuned, whole-tuned, untuned, onnxruntime.
    db.execute("ALTER TABLE workloads ADD COLUMN prim TEXT")
    _script(
        db, """
        CREATE TABLE model_runs (
            id INTEGER PRIMARY KEY, run TEXT NOT NULL, model TEXT NOT NULL, model_hash TEXT NOT NULL,
            device_id TEXT NOT NULL REFERENCES devices(id), partition TEXT NOT NULL, ratio REAL NOT NULL,
            granted_units INTEGER, variant TEXT NOT NULL, status TEXT NOT NULL, error TEXT, latency_s REAL,
            times TEXT, rel_err REAL, tuned_tasks INTEGER, n_tasks INTEGER, trials INTEGER, detail TEXT,
            created_at TEXT NOT NULL);
        CREATE INDEX model_runs_by_model ON model_runs (model, device_id, partition, ratio)
        """
    )


def _script(db: sqlite_utils.Database, sql: str) -> None:
    for stmt in sql.split(";"):
        if stmt.strip():
            db.execute(stmt)


MIGRATIONS: dict[int, Callable[["sqlite_utils.Database"], None]] = {1: _migrate_to_1, 2: _migrate_to_2,
                                                                   3: _migrate_to_3, 4: _migrate_to_4}
