"""Runtime lookup: which tuned kernel should a scheduler launch for the share it just granted?

A scheduler asks with a workload (key, spec name, :class:`~spatialtune.workloads.spec.Workload`,
or ``key_for(op, shape)``), the share it granted, the interference it expects and, when the
database holds several, the device. The answer is a :class:`LookupResult`: the config to use
(``mod_hash``, ``measurement_id``; the trace through :meth:`Lookup.trace`), the share it was
tuned for, its measured time, and why it was chosen.

The share is given one of two ways (see :class:`spatialtune.terms.Share` for what the database
stores): ``ratio``, a percentage compared with the ratio each config is keyed by (for core sets
and green contexts the fraction granted, for MPS the active-thread percentage), or ``units``,
the cores or SMs granted, compared with the units each config's measurements really had (for
MPS, the SMs the client saw: MPS 25 % on an H200 gives 32).

Which device: by default the caller's own. The first :class:`Lookup` of a process identifies
the machine it runs on (the same device ids ``tune`` records: its CPU, and its GPUs where NVML
finds them; identifying the CPU loads TVM's LLVM once per process, a second or two, so pass
``here`` or a ``device`` to skip it) and answers only from configs tuned on it: a database from
another machine answers a miss that names the devices it has. ``device=`` names one explicitly;
``any_device=True`` lets a database of one device answer for it, and the answer then says it is
another device's config (``other_device``).

Rules, in order (the share rule runs within the requested interference condition first, then
within ``none`` when nothing was tuned under the requested one; :mod:`.rules` says why each is
safe):

1. ``exact``: a config tuned for exactly the granted share;
2. ``below``: the config tuned for the largest share below the granted one;
3. ``above``: the config tuned for the smallest share above it;
4. ``miss``: no config; ``found`` is False and ``reason`` says why. A miss never raises; only
   malformed arguments (no share, both a ratio and units, a ratio outside (0, 100]) raise
   :class:`~spatialtune.errors.ConfigError`.

Answers are checked measurements only: a MetaSchedule record imported without our output check
(status ``unchecked``) is served only by a ``Lookup(include_unchecked=True)``, marked
``checked: False``. Where the vendor library (numpy on a CPU, cuBLAS on a GPU) was measured
faster than the answer's kernel under the same condition, the answer says so: ``prefer:
"vendor"`` with ``vendor`` and ``vendor_s`` beside the kernel's ``median_s``.

Concurrency and reloads. A :class:`Lookup` holds an immutable :class:`LookupIndex`: one
snapshot of the database (its SQLite ``data_version`` and file identity). Answers are pure
memory reads, memoised per index, and safe from any number of threads. The best rows of a
workload are read the first time it is asked about (so opening a 10k-row database costs one
indexed query, not a full load), all inside the same snapshot: if the database changed in the
meantime a fresh index replaces the old one in one reference assignment, so an answer never
mixes two versions. :meth:`Lookup.refresh` (called automatically every ``check_interval_s``
seconds by ``lookup``) polls ``data_version`` and the file's inode, and swaps in a fresh index
when the database was written or replaced. Traces are read on demand by measurement id:
measurement rows are never updated, so a cached trace cannot go stale.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import ConfigError, DatabaseError
from ..store.schema import BEST_INDEX_SQL, SCHEMA_VERSION, decode_trace
from ..terms import norm_ratio
from .index import LookupIndex, LookupResult

log = logging.getLogger(__name__)

_MEMO_MAX = 1 << 16
_TRACES_MAX = 1024


class _Reader:
    """A read-only SQLite connection for the lookup: no sqlite-utils (its plugin discovery alone
    costs ~25 ms at first open), no migrations, and no way for a scheduler to write the file."""

    _BEST = BEST_INDEX_SQL
    # The same columns with unchecked (imported) rows competing: the fastest ok-or-unchecked row per
    # key, and every row of the key counted as a trial (as the best table counts them).
    _BEST_ANY = ("SELECT workload_key, device_id, partition, ratio, interference, id, median_s, n, mod_hash,"
                 " granted_units, created_at, status FROM (SELECT m.*, ROW_NUMBER() OVER (PARTITION BY"
                 " workload_key, device_id, partition, ratio, interference ORDER BY status NOT IN ('ok', 'unchecked'),"
                 " median_s, id) AS rn, COUNT(*) OVER (PARTITION BY workload_key, device_id, partition, ratio,"
                 " interference) AS n FROM measurements m {}) WHERE rn = 1 AND status IN ('ok', 'unchecked')")

    def __init__(self, path: Path):
        if not path.is_file():
            raise DatabaseError(f"{path}: no such database")
        self.immutable = False
        try:
            row = self._open(path, "mode=ro")
        except sqlite3.OperationalError as e:
            # A WAL database whose directory we cannot write: SQLite cannot create the shared-memory
            # file a WAL reader needs. With no log left to read, the main file is the whole database
            # and can be read as immutable (no writer can change it here).
            wal = Path(f"{path}-wal")
            if os.access(path.parent, os.W_OK) or (wal.exists() and wal.stat().st_size > 0):
                raise DatabaseError(
                    f"{path}: cannot be read ({e})" + ("; its directory is read-only and its write-ahead log holds "
                                                       "data: checkpoint it where it is writable (spatialtune db "
                                                       "vacuum) or read a copy" if wal.exists() else "")) from None
            try:
                row = self._open(path, "mode=ro&immutable=1")
            except sqlite3.DatabaseError as e2:
                raise DatabaseError(f"{path}: not a spatialtune database ({e2})") from None
            self.immutable = True
            log.info("%s: read-only directory, reading the database as immutable", path)
        except sqlite3.DatabaseError as e:
            raise DatabaseError(f"{path}: not a spatialtune database ({e})") from None
        version = int(row[0]) if row else 0
        if version != SCHEMA_VERSION:
            self.conn.close()
            raise DatabaseError(f"{path}: schema v{version}, this spatialtune reads v{SCHEMA_VERSION}: "
                                "open it once with `spatialtune show --db` to upgrade it")

    def _open(self, path: Path, params: str):
        self.conn = sqlite3.connect(f"{path.resolve().as_uri()}?{params}", uri=True, isolation_level=None,
                                    check_same_thread=False)
        try:
            return self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError:
            self.conn.close()
            raise

    def data_version(self) -> int:
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    @contextmanager
    def snapshot(self):
        self.conn.execute("BEGIN")
        try:
            yield self
        finally:
            self.conn.execute("COMMIT")

    def workload_names(self) -> dict[str, str]:
        return {k: n or "" for k, n in self.conn.execute("SELECT key, name FROM workloads")}

    def device_units(self) -> dict[str, int]:
        return {i: int(u) for i, u in self.conn.execute("SELECT id, units FROM devices")}

    def device_unit_names(self) -> dict[str, str]:
        return {i: u for i, u in self.conn.execute("SELECT id, unit FROM devices")}

    def device_names(self) -> dict[str, str]:
        return {i: n for i, n in self.conn.execute("SELECT id, name FROM devices")}

    def best_rows(self, workload_key: str | None = None, unchecked: bool = False) -> list[tuple]:
        if unchecked:
            where, args = ("WHERE workload_key = ?", [workload_key]) if workload_key else ("", [])
            return self.conn.execute(self._BEST_ANY.format(where), args).fetchall()
        if workload_key is None:
            return self.conn.execute(self._BEST).fetchall()
        return self.conn.execute(self._BEST + " WHERE b.workload_key = ?", [workload_key]).fetchall()

    def vendor_rows(self, workload_key: str) -> list[tuple]:
        return self.conn.execute("SELECT device_id, partition, ratio, interference, kind, median_s FROM baselines"
                                 " WHERE workload_key = ?", [workload_key]).fetchall()

    def trace_of(self, measurement_id: int) -> str | None:
        row = self.conn.execute("SELECT trace FROM measurements WHERE id = ?", [measurement_id]).fetchone()
        return decode_trace(row[0]) if row else None

    def close(self) -> None:
        self.conn.close()


class Lookup:
    """The lookup service over one database file. Build one per process (see :func:`get_lookup`).

    Thread-safe: ``lookup`` may be called from any thread at any time, including while the
    database is being written by another process. To deploy a new database file under a live
    lookup, copy it in with SQLite's backup API (``sqlite3 LIVE ".restore NEW"``): renaming a file over
    a WAL database leaves the old write-ahead log next to the new file.

    ``check_interval_s``: how often ``lookup`` polls for a changed database (None: never; call
    :meth:`refresh`). ``preload``: read every workload's best rows now instead of on first use.
    """

    def __init__(self, path: str | Path, *, check_interval_s: float | None = 1.0, preload: bool = False,
                 here: Iterable[str] | None = None, any_device: bool = False, include_unchecked: bool = False):
        self.path = Path(path)
        self.check_interval_s = check_interval_s
        self.preload = preload
        self.any_device, self.include_unchecked = any_device, include_unchecked
        self._here = None if here is None else frozenset(here)
        self._lock = threading.RLock()
        self._traces: dict[int, str] = {}
        self._db: _Reader | None = None
        self._ino: tuple[int, int] | None = None
        self._next_check = float("inf") if check_interval_s is None else time.monotonic() + check_interval_s
        self._index = self._build_index()

    # -- loading -------------------------------------------------------------------------------

    def _conn(self) -> _Reader:
        # Reopen when the file was replaced: the old connection would keep reading the old inode.
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise DatabaseError(f"{self.path}: no such database") from None
        ino = (st.st_dev, st.st_ino)
        if self._db is None or ino != self._ino:
            if self._db is not None:
                self._db.close()
            self._db = _Reader(self.path)
            self._ino = ino
        return self._db

    def _version(self, db: _Reader) -> tuple:
        return (self._ino, db.data_version())

    def _build_index(self, with_keys: tuple[str, ...] = ()) -> LookupIndex:
        """A fresh index, plus the groups of ``with_keys``, all from one read snapshot."""
        with self._lock:
            db = self._conn()
            with db.snapshot():
                wnames = db.workload_names()
                names: dict[str, set[str]] = {}
                for key, name in wnames.items():
                    names.setdefault(key, set()).add(key)
                    if name:
                        names.setdefault(name, set()).add(key)
                devices = db.device_units()
                if self._here is None and not self.any_device:
                    self._here = this_machine({db_kind(d) for d in devices})
                idx = LookupIndex(self._version(db), devices, {k: tuple(sorted(v)) for k, v in names.items()},
                                  db.device_unit_names(), device_names=db.device_names(), here=self._here,
                                  any_device=self.any_device)
                if self.preload:
                    rows: dict[str, list[tuple]] = {k: [] for k in wnames}
                    for r in db.best_rows(unchecked=self.include_unchecked):
                        rows.setdefault(r[0], []).append(r)
                    for k, rs in rows.items():
                        idx.add_rows(k, rs, db.vendor_rows(k))
                for k in with_keys:
                    if k not in idx.groups:
                        idx.add_rows(k, db.best_rows(k, self.include_unchecked), db.vendor_rows(k))
            log.debug("lookup index of %s at version %s", self.path, idx.version)
            return idx

    def _load_group(self, idx: LookupIndex, wkey: str) -> LookupIndex:
        """An index holding ``wkey``'s rows: ``idx`` itself, or a fresh one if the database
        moved on since ``idx`` was read (so one index never mixes two versions)."""
        with self._lock:
            if self._index is not idx:  # another thread swapped in a newer snapshot
                idx = self._index
            if wkey in idx.groups:
                return idx
            db = self._conn()
            with db.snapshot():
                rows = db.best_rows(wkey, self.include_unchecked)
                vendor = db.vendor_rows(wkey)
                version = self._version(db)
            if version == idx.version:
                idx.add_rows(wkey, rows, vendor)
                return idx
            idx = self._build_index((wkey,))
            self._index = idx
            return idx

    def refresh(self, *, force: bool = False) -> bool:
        """Swap in a fresh index if the database changed (or ``force``); returns whether it did."""
        with self._lock:
            if self.check_interval_s is not None:
                self._next_check = time.monotonic() + self.check_interval_s
            try:
                st = os.stat(self.path)
                changed = (force or (st.st_dev, st.st_ino) != self._ino
                           or self._version(self._conn()) != self._index.version)
                if changed:
                    self._index = self._build_index()
            except (OSError, sqlite3.Error, DatabaseError) as e:  # keep answering from the snapshot we have
                log.warning("lookup: cannot check %s (%s); keeping the loaded index", self.path, e)
                return False
            return changed

    @property
    def index(self) -> LookupIndex:
        return self._index

    # -- answers -------------------------------------------------------------------------------

    def lookup(self, workload: Any, *, ratio: float | None = None, units: int | None = None,
               interference: str = "none", device: str | None = None,
               partition: str | None = None) -> LookupResult:
        """The config to use for ``workload`` under the granted share. Never raises on a miss.

        ``workload``: a key, a spec name, or a Workload. Give exactly one of ``ratio`` (percent
        of the device, (0, 100]) or ``units`` (cores or SMs granted; needs the device's size,
        so ``device`` must be given or unique in the database).
        """
        if time.monotonic() >= self._next_check:
            self.refresh()
        idx = self._index
        asked = workload if isinstance(workload, str) else workload.key
        mkey = (asked, ratio, units, interference, device, partition)
        hit = idx.memo.get(mkey)
        if hit is not None:
            return hit
        r = self._slow(idx, asked, ratio, units, interference, device, partition)
        return r

    def _slow(self, idx, asked, ratio, units, interference, device, partition) -> LookupResult:
        if (ratio is None) == (units is None):
            raise ConfigError("lookup: give exactly one of ratio (percent) or units (cores/SMs)")
        if ratio is not None and not (0 < ratio <= 100):
            raise ConfigError(f"lookup: ratio must be a percentage in (0, 100], got {ratio!r}")
        if units is not None and (isinstance(units, bool) or not isinstance(units, int) or units < 1):
            raise ConfigError(f"lookup: units must be a positive integer, got {units!r}")
        try:
            for k in idx.names.get(asked, ()):
                if k not in idx.groups:
                    idx = self._load_group(idx, k)
        except (sqlite3.Error, OSError, DatabaseError) as e:  # not memoised: the next call retries
            log.warning("lookup: cannot read %s: %s", self.path, e)
            return LookupResult(asked, None, ratio, interference, "miss", f"database unreadable: {e}")
        res = idx.resolve(asked, None if ratio is None else norm_ratio(ratio), interference, device, partition,
                          units)
        return self._memo(idx, (asked, ratio, units, interference, device, partition), res)

    @staticmethod
    def _memo(idx: LookupIndex, key: tuple, res: LookupResult) -> LookupResult:
        if len(idx.memo) < _MEMO_MAX:  # bounded: an adversarial stream of ratios cannot grow it forever
            idx.memo[key] = res
        return res

    def trace(self, result: LookupResult) -> str | None:
        """The stored MetaSchedule trace (``tvm.ir.save_json``) of a found config, else None."""
        if result.measurement_id is None:
            return None
        t = self._traces.get(result.measurement_id)
        if t is None:
            with self._lock:
                t = self._conn().trace_of(result.measurement_id)
            if t is not None:
                if len(self._traces) >= _TRACES_MAX:  # ~10 KB each; a scheduler reuses a few
                    self._traces.clear()
                self._traces[result.measurement_id] = t
        return t

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> "Lookup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def db_kind(device_id: str) -> str:
    """A device id's kind (ids are ``KIND-HASH``, see :class:`spatialtune.device.DeviceInfo`)."""
    return device_id.split("-", 1)[0]


_MACHINE: dict[str, frozenset[str]] = {}


def this_machine(kinds: Iterable[str]) -> frozenset[str]:
    """The device ids of this machine for the given kinds (``cpu``, ``cuda``), as ``tune`` would
    record them; identified once per process and kind. A kind this machine lacks (no GPU)
    adds nothing."""
    out: set[str] = set()
    for kind in sorted(set(kinds)):
        if kind not in _MACHINE:
            from ..device import detect_cpu, detect_cuda
            from ..errors import DeviceError

            try:
                _MACHINE[kind] = frozenset([detect_cpu().id] if kind == "cpu" else
                                           [detect_cuda().id] if kind == "cuda" else [])
            except DeviceError:
                _MACHINE[kind] = frozenset()
        out |= _MACHINE[kind]
    return frozenset(out)


_PER_PROCESS: dict[Path, Lookup] = {}
_PER_PROCESS_LOCK = threading.Lock()


def get_lookup(path: str | Path, **kwargs: Any) -> Lookup:
    """The process-wide :class:`Lookup` for ``path`` (created on first use, then shared)."""
    p = Path(path).resolve()
    lk = _PER_PROCESS.get(p)
    if lk is None:
        with _PER_PROCESS_LOCK:
            lk = _PER_PROCESS.get(p)
            if lk is None:
                lk = _PER_PROCESS[p] = Lookup(p, **kwargs)
    return lk


def key_for(op: str, shape: Mapping[str, int], dtype: str = "fp32") -> str:
    """The workload key of an operator and shape, as the database stores it (see spec.make_key)."""
    from ..workloads.ops import get_operator
    from ..workloads.spec import make_key

    return make_key(op, dtype, get_operator(op).check_params(shape))
