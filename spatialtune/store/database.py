"""The tuning database: every measurement, the best config per key, the cost models.

One SQLite file (WAL mode, so a lookup process can read while a tuning job writes), opened
through sqlite-utils. Every write is one ``BEGIN IMMEDIATE`` transaction, so a job killed at any point
leaves the file consistent and holding everything it had finished.

Keys. A measurement is valid for exactly one *tuning key*: (workload, device, partition, ratio,
interference). ``best`` holds one row per tuning key; ``measurements`` is unique per tuning key
and kernel (``mod_hash``), which is what stops a resumed job from measuring a trial twice.

Schema versions: :mod:`spatialtune.store.schema`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_utils

from ..errors import DatabaseError
from ..terms import norm_ratio
from .records import (MEASUREMENT_COLUMNS, BestConfig, BestIndexRow, Measurement, SavedCostModel,
                      measurement_from_row)
from .schema import BEST_INDEX_SQL, KEY_FIELDS, MIGRATIONS, SCHEMA_VERSION, STATUSES, decode_trace, encode_trace

log = logging.getLogger(__name__)

def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------- the database


class TuningDatabase:
    """A tuning database file. Not shared between threads; open one per thread or process.

    The contract a caller may rely on:

    - **Several processes** may open one file and call every method at once: each write is one
      ``BEGIN IMMEDIATE`` transaction (waiting up to 30 s for the lock), so jobs on the same keys
      interleave whole measurements, and :meth:`record` of a kernel already measured under a key
      is a no-op returning None (the first measurement stands), except that it replaces an
      ``unchecked`` (imported) row with the checked one.
    - **Readers** see committed states only. A ``best`` row always points at the fastest ``ok``
      measurement of its key, updated in the same transaction as the measurement; measurement
      rows are never deleted, and only :meth:`add_times` (a confirmation's repeats) and the
      replacement of an ``unchecked`` row change one.
    - Rows come out as frozen types (:class:`Measurement` is the one mutable exception: it is what
      callers fill in before :meth:`record`): :class:`BestConfig`, :class:`BestIndexRow`,
      :class:`SavedCostModel`.
    """

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise DatabaseError(f"{self.path}: no such database")
        if self.path.exists() and self.path.is_dir():
            raise DatabaseError(f"{self.path}: is a directory, not a database file")
        if self.path.parent and not self.path.parent.exists():
            raise DatabaseError(f"{self.path}: directory {self.path.parent} does not exist")
        try:
            conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
            self.db = sqlite_utils.Database(conn)
            self.db.execute("PRAGMA foreign_keys = ON")
            self._open_schema()
        except sqlite3.DatabaseError as e:
            raise DatabaseError(f"{self.path}: not a spatialtune database ({e})") from None

    # -- schema ------------------------------------------------------------------------------

    def _open_schema(self) -> None:
        version = self._version_on_disk()
        if version < SCHEMA_VERSION:
            if self.db.journal_mode != "wal":
                self.db.enable_wal()
            # Several jobs may open a new or old file at once: the first to hold the write lock
            # creates or upgrades it, the others find it done when they get the lock.
            self.db.execute("BEGIN IMMEDIATE")
            try:
                version = self._version_on_disk()
                if version == 0:
                    self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    log.info("upgrading %s to schema v%d", self.path, v)
                    MIGRATIONS[v](self.db)
                self.db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]
                )
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.conn.in_transaction:
                    self.db.execute("ROLLBACK")
                raise

    def _version_on_disk(self) -> int:
        tables = set(self.db.table_names())
        if not tables:
            return 0
        if "meta" not in tables:
            raise DatabaseError(f"{self.path}: not a spatialtune database (tables: {', '.join(sorted(tables))})")
        version = self.schema_version
        if version > SCHEMA_VERSION:
            raise DatabaseError(
                f"{self.path}: database schema v{version} is newer than this spatialtune supports "
                f"(v{SCHEMA_VERSION}): upgrade spatialtune to open it"
            )
        return version

    @property
    def schema_version(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    def integrity_check(self) -> str:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0]

    def vacuum(self) -> tuple[int, int]:
        """Fold the write-ahead log into the file and compact it; returns (bytes before, after).
        Fails with a DatabaseError while another process holds the database open for writing."""
        def size() -> int:
            return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())

        before = size()
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.db.execute("VACUUM")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError as e:
            raise DatabaseError(f"{self.path}: cannot compact it now ({e}): is a job writing it?") from None
        return before, size()

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def _write(self):
        # BEGIN IMMEDIATE takes the write lock up front, where the busy timeout waits for it. A
        # deferred BEGIN that reads before it writes (add_times) cannot wait: when another job
        # committed since its read, SQLite answers "database is locked" at once.
        if self.db.conn.in_transaction:
            with self.db.atomic():
                yield
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self.db.conn.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def __enter__(self) -> "TuningDatabase":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- workloads and devices ----------------------------------------------------------------

    def add_workload(self, w) -> None:
        """Register a workload (a workloads.spec.Workload). The same key with another spec (an
        operator whose definition changed since the database was written) is refused. Safe when
        several jobs register the same workload at once."""
        with self._write():
            self.db.execute(
                "INSERT OR IGNORE INTO workloads (key, op, dtype, params, spec_hash, name, model, flops, prim,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [w.key, w.op, w.dtype, json.dumps(dict(w.params)), w.spec_hash, w.name, w.model, w.flops,
                 None if w.prim is None else json.dumps(w.prim.to_dict()), _now()],
            )
        row = self.db.execute("SELECT spec_hash, model FROM workloads WHERE key = ?", [w.key]).fetchone()
        if row[0] != w.spec_hash:
            raise DatabaseError(f"workload {w.key}: database has spec {row[0]}, this spec is {w.spec_hash}")
        models = list(dict.fromkeys(filter(None, [*(row[1] or "").split(", "), *w.model.split(", ")])))
        if w.prim is not None and ", ".join(models) != (row[1] or ""):  # one task, several models: name them all
            with self.db.atomic():
                self.db.execute("UPDATE workloads SET model = ? WHERE key = ?", [", ".join(models), w.key])

    def workload(self, key: str):
        from ..workloads.spec import Workload

        row = self.db.execute("SELECT op, dtype, params, name, model, prim FROM workloads WHERE key = ?",
                              [key]).fetchone()
        if not row:
            return None
        return Workload.from_dict({"op": row[0], "dtype": row[1], "params": json.loads(row[2]), "name": row[3] or "",
                                   "model": row[4] or "", "prim": json.loads(row[5]) if row[5] else None})

    def workloads(self) -> list:
        return [self.workload(r[0]) for r in self.db.execute("SELECT key FROM workloads ORDER BY key").fetchall()]

    def find_workload(self, name_or_key: str) -> list[str]:
        """Workload keys matching a key or a spec name."""
        rows = self.db.execute("SELECT key FROM workloads WHERE key = ? OR name = ? ORDER BY key",
                               [name_or_key, name_or_key]).fetchall()
        return [r[0] for r in rows]

    def add_device(self, dev) -> str:
        """Register a device (a device.DeviceInfo); returns its id."""
        with self._write():
            self.db.execute(
                "INSERT OR IGNORE INTO devices (id, kind, name, uuid, units, unit, driver, arch, tvm_version, mattr,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [dev.id, dev.kind, dev.name, dev.uuid, dev.units, dev.unit, dev.driver, dev.arch, dev.tvm_version,
                 dev.mattr, _now()],
            )
        return dev.id

    def devices(self) -> list[dict[str, Any]]:
        return list(self.db.query("SELECT * FROM devices ORDER BY created_at, id"))

    def device(self, device_id: str) -> dict[str, Any] | None:
        rows = list(self.db.query("SELECT * FROM devices WHERE id = ?", [device_id]))
        return rows[0] if rows else None

    # -- measurements -------------------------------------------------------------------------

    def record(self, m: Measurement) -> int | None:
        """Store one measurement and refresh the best config of its key, in one transaction.

        Returns the new row id, or None when this kernel was already measured under this key
        (a resumed job re-proposing a candidate): the first measurement stands.
        """
        if m.status not in STATUSES:
            raise DatabaseError(f"unknown measurement status {m.status!r} (known: {', '.join(STATUSES)})")
        if m.status == "ok" and (m.median_s is None or not np.isfinite(m.median_s) or m.median_s <= 0):
            raise DatabaseError(f"measurement of {m.workload_key} has status ok but no valid time")
        feats = None if m.features is None else np.asarray(m.features, dtype=np.float32).tobytes()
        with self._write():
            cur = self.db.execute(
                "INSERT OR IGNORE INTO measurements (workload_key, device_id, partition, ratio, interference, mod_hash,"
                " trace, status, error, times, median_s, rel_err, granted_units, granted_share, neighbour_throughput,"
                " neighbour_unit, build_s, run_s, search_s, features, source, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [m.workload_key, m.device_id, m.partition, norm_ratio(m.ratio), m.interference, m.mod_hash,
                 encode_trace(m.trace),
                 m.status, m.error, json.dumps(m.times), m.median_s, _finite(m.rel_err), m.granted_units,
                 m.granted_share, m.neighbour_throughput, m.neighbour_unit, m.build_s, m.run_s, m.search_s, feats,
                 m.source, m.created_at or _now()],
            )
            if cur.rowcount == 0:
                return self._check_unchecked(m, feats) if m.status != "unchecked" else None
            m.id = cur.lastrowid
            self._refresh_best(m.key)
        return m.id

    def _check_unchecked(self, m: Measurement, feats: bytes | None) -> int | None:
        """A kernel stored ``unchecked`` (imported) now measured here with the output check: the
        measurement replaces the row in place (its id and source kept), inside the caller's
        transaction. Any other row already under the key stands."""
        where = " AND ".join(f"{f} = ?" for f in KEY_FIELDS)
        row = self.db.execute(f"SELECT id FROM measurements WHERE {where} AND mod_hash = ? AND status = 'unchecked'",
                              [*m.key, m.mod_hash]).fetchone()
        if row is None:
            return None
        self.db.execute(
            "UPDATE measurements SET status = ?, error = ?, times = ?, median_s = ?, rel_err = ?, granted_units = ?,"
            " granted_share = ?, neighbour_throughput = ?, neighbour_unit = ?, build_s = ?, run_s = ?, search_s = ?,"
            " features = COALESCE(?, features), created_at = ? WHERE id = ?",
            [m.status, m.error, json.dumps(m.times), m.median_s, _finite(m.rel_err), m.granted_units, m.granted_share,
             m.neighbour_throughput, m.neighbour_unit, m.build_s, m.run_s, m.search_s, feats, _now(), row[0]])
        m.id = row[0]
        self._refresh_best(m.key)
        return m.id

    def add_times(self, m: Measurement, times: list[float]) -> float:
        """Append the repeats of a later measurement of the same kernel under the same key (a
        confirmation) and make the median of all of them its time; returns the new median.
        The kernel's first measurement keeps its status, features and date."""
        where = " AND ".join(f"{f} = ?" for f in KEY_FIELDS)
        with self._write():
            row = self.db.execute(f"SELECT id, times FROM measurements WHERE {where} AND mod_hash = ? AND status = 'ok'",
                                  [*m.key, m.mod_hash]).fetchone()
            if row is None:
                raise DatabaseError(f"no ok measurement of {m.mod_hash} under {m.key} to add times to")
            all_times = (json.loads(row[1]) if row[1] else []) + [float(t) for t in times]
            median = float(np.median(all_times))
            self.db.execute("UPDATE measurements SET times = ?, median_s = ? WHERE id = ?",
                            [json.dumps(all_times), median, row[0]])
            self._refresh_best(m.key)
        return median

    def _refresh_best(self, key: tuple) -> None:
        where = " AND ".join(f"{f} = ?" for f in KEY_FIELDS)
        n = self.db.execute(f"SELECT COUNT(*) FROM measurements WHERE {where}", list(key)).fetchone()[0]
        row = self.db.execute(
            f"SELECT id, median_s FROM measurements WHERE {where} AND status = 'ok' ORDER BY median_s, id LIMIT 1",
            list(key),
        ).fetchone()
        if row is None:
            return
        self.db.execute(
            "INSERT OR REPLACE INTO best (workload_key, device_id, partition, ratio, interference, measurement_id,"
            " median_s, n_trials, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [*key, row[0], row[1], n, _now()],
        )

    def measurements(self, *, workload_key: str | None = None, device_id: str | None = None,
                     partition: str | None = None, ratio: float | None = None, interference: str | None = None,
                     status: str | None = None, with_features: bool = False) -> list[Measurement]:
        conds, args = _filters(workload_key=workload_key, device_id=device_id, partition=partition,
                               ratio=None if ratio is None else norm_ratio(ratio), interference=interference,
                               status=status)
        cols = "*" if with_features else ", ".join(c for c in MEASUREMENT_COLUMNS if c != "features")
        rows = self.db.query(f"SELECT {cols} FROM measurements {conds} ORDER BY id", args)
        return [measurement_from_row(r) for r in rows]

    def count_measurements(self, **filters) -> int:
        conds, args = _filters(**filters)
        return self.db.execute(f"SELECT COUNT(*) FROM measurements {conds}", args).fetchone()[0]

    def best(self, *, workload_key: str | None = None, device_id: str | None = None, partition: str | None = None,
             ratio: float | None = None, interference: str | None = None) -> list[BestConfig]:
        conds, args = _filters(prefix="b.", workload_key=workload_key, device_id=device_id, partition=partition,
                               ratio=None if ratio is None else norm_ratio(ratio), interference=interference)
        rows = self.db.execute(
            "SELECT b.workload_key, b.device_id, b.partition, b.ratio, b.interference, b.measurement_id, b.median_s,"
            " b.n_trials, m.mod_hash, m.trace, m.granted_units, m.granted_share, b.updated_at"
            f" FROM best b JOIN measurements m ON m.id = b.measurement_id {conds}"
            " ORDER BY b.workload_key, b.device_id, b.partition, b.interference, b.ratio DESC",
            args,
        ).fetchall()
        return [BestConfig(*r[:9], decode_trace(r[9]), *r[10:]) for r in rows]

    # -- cost models and baselines -------------------------------------------------------------

    def save_cost_model(self, device_id: str, partition: str, ratio: float, interference: str, kind: str,
                        model_json: str, n_samples: int) -> None:
        with self._write():
            self.db.execute(
                "INSERT OR REPLACE INTO cost_models (device_id, partition, ratio, interference, kind, model, n_samples,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [device_id, partition, norm_ratio(ratio), interference, kind, model_json, n_samples, _now()],
            )

    def load_cost_model(self, device_id: str, partition: str, ratio: float,
                        interference: str) -> SavedCostModel | None:
        row = self.db.execute(
            "SELECT kind, model, n_samples FROM cost_models WHERE device_id = ? AND partition = ? AND ratio = ?"
            " AND interference = ?",
            [device_id, partition, norm_ratio(ratio), interference],
        ).fetchone()
        return SavedCostModel(*row) if row else None

    def record_baseline(self, workload_key: str, device_id: str, partition: str, ratio: float, interference: str,
                        kind: str, median_s: float, granted_units: int | None = None) -> None:
        with self._write():
            self.db.execute(
                "INSERT OR REPLACE INTO baselines (workload_key, device_id, partition, ratio, interference, kind,"
                " median_s, granted_units, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [workload_key, device_id, partition, norm_ratio(ratio), interference, kind, median_s, granted_units,
                 _now()],
            )

    def baselines(self, **filters) -> list[dict[str, Any]]:
        if "ratio" in filters and filters["ratio"] is not None:
            filters["ratio"] = norm_ratio(filters["ratio"])
        conds, args = _filters(**filters)
        return list(self.db.query(f"SELECT * FROM baselines {conds} ORDER BY workload_key, ratio DESC, kind", args))

    # -- readers for lookup, report and merge (appended; the methods above are unchanged) ----

    def best_index_rows(self, workload_key: str | None = None) -> list[BestIndexRow]:
        """Best rows without the trace (traces are ~10 KB each and most readers never need them)."""
        conds, args = _filters(prefix="b.", workload_key=workload_key)
        return [BestIndexRow(*r[:-1]) for r in self.db.execute(f"{BEST_INDEX_SQL} {conds}", args).fetchall()]

    def workload_names(self) -> dict[str, str]:
        """Workload key -> name ('' when unnamed)."""
        return {r[0]: r[1] or "" for r in self.db.execute("SELECT key, name FROM workloads").fetchall()}

    def add_baseline_row(self, row: dict[str, Any]) -> bool:
        """Insert a baselines row as it is (its measurement date kept); an existing key stands.

        Returns whether it was inserted. For merging databases, where ``record_baseline`` would
        restamp the date.
        """
        cols = ("workload_key", "device_id", "partition", "ratio", "interference", "kind", "median_s",
                "granted_units", "created_at")
        with self._write():
            cur = self.db.execute(
                f"INSERT OR IGNORE INTO baselines ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                [norm_ratio(row[c]) if c == "ratio" else row.get(c) for c in cols])
        return cur.rowcount > 0


def _finite(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _filters(prefix: str = "", **kw) -> tuple[str, list]:
    conds, args = [], []
    for k, v in kw.items():
        if v is not None:
            conds.append(f"{prefix}{k} = ?")
            args.append(v)
    return ("WHERE " + " AND ".join(conds)) if conds else "", args
