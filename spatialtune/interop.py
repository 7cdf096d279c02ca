"""Interop with TVM's own MetaSchedule databases, and merging databases of several hosts.

- :func:`export_metaschedule` writes the configs a scheduler would use at one share (the
  :mod:`spatialtune.lookup` rules: exact, else nearest share below, else 100 %) as a MetaSchedule
  ``JSONDatabase`` (``database_workload.json``, ``database_tuning_record.json``), through TVM's
  own ``JSONDatabase`` so a Relax or ``tvm.compile`` pipeline can apply them
  (``MetaScheduleApplyDatabase``) and ``query_tuning_record`` returns our trace.
- :func:`import_metaschedule` takes a MetaSchedule database as measurements at a given share
  (status ``ok``, source ``import``); tuning then uses them as already-measured trials of that
  share and as seeds for the other shares. Records are matched to workloads structurally (as
  MetaSchedule matches them), against the database's workloads plus any given.
- :func:`merge_databases` writes a new database holding every source's devices, workloads,
  measurements (dates kept) and baselines; a kernel measured under the same tuning key on
  several hosts is kept once (the first source's measurement stands) and ``best`` is recomputed.
  Sources are opened read-only and never modified.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .database import Measurement, TuningDatabase, norm_ratio
from .errors import ConfigError, DatabaseError

log = logging.getLogger(__name__)

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
_MS_FAILED = 1e9  # MetaSchedule stores 1e10 s as the time of a failed run


@dataclass
class ExportSummary:
    out: str
    ratio: float
    interference: str
    exported: list[dict[str, Any]] = field(default_factory=list)  # key, match, tuned_ratio, median_s
    skipped: list[dict[str, str]] = field(default_factory=list)  # key, reason

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ImportSummary:
    records: int = 0
    imported: int = 0
    duplicates: int = 0
    unmatched: int = 0  # workload not in the database (pass --space)
    invalid: int = 0  # failed run, or a trace that does not replay
    device_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MergeSummary:
    out: str
    sources: list[str]
    devices: int = 0
    workloads: int = 0
    measurements: int = 0
    duplicates: int = 0
    baselines: int = 0
    best: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _target(device: dict) -> dict:
    from .builder import target_for

    return target_for(device["kind"], cores=device["units"] if device["kind"] == "cpu" else None,
                      arch=device.get("arch") or "sm_90")


def _only(values: set[str], what: str, flag: str) -> str:
    if len(values) != 1:
        raise ConfigError(f"the database holds several {what} ({', '.join(sorted(values))}): pass {flag}")
    return next(iter(values))


# ---------------------------------------------------------------- export


def export_metaschedule(db: TuningDatabase, ratio: float, out: Path, *, interference: str = "none",
                        device_id: str | None = None, partition: str | None = None) -> ExportSummary:
    """Write the configs for ``ratio`` (percent) as a MetaSchedule JSON database under ``out``.

    Existing database files in ``out`` are replaced, atomically per file. Raises ConfigError when
    the device or partition is ambiguous or nothing can be exported.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from .apply import replay_trace
    from .lookup import Lookup

    if not (0 < ratio <= 100):
        raise ConfigError(f"--ratio must be a percentage in (0, 100], got {ratio!r}")
    rows = db.best_index_rows()
    if not rows:
        raise ConfigError(f"{db.path}: no tuned configs to export")
    device_id = device_id or _only({r[1] for r in rows}, "devices", "--device")
    partition = partition or _only({r[2] for r in rows if r[1] == device_id} or {"?"}, "partitions", "--partition")
    device = db.device(device_id)
    if device is None:
        raise ConfigError(f"no device {device_id} in {db.path}")
    target = tvm.target.Target(_target(device))
    summary = ExportSummary(str(out), norm_ratio(ratio), interference)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        msdb = ms.database.JSONDatabase(path_workload=str(tmp / WORKLOAD_FILE),
                                        path_tuning_record=str(tmp / RECORD_FILE), allow_missing=True)
        with Lookup(db.path, check_interval_s=None, preload=True) as lk:
            for key in sorted({r[0] for r in rows}):
                res = lk.lookup(key, ratio=ratio, interference=interference, device=device_id, partition=partition)
                if not res.found:
                    summary.skipped.append({"key": key, "reason": res.reason})
                    continue
                w = db.workload(key)
                mod = w.ir_module()
                try:
                    sch = replay_trace(w, lk.trace(res))
                except Exception as e:
                    summary.skipped.append({"key": key, "reason": f"trace does not replay: {e}"})
                    continue
                wl = msdb.commit_workload(mod)
                msdb.commit_tuning_record(ms.database.TuningRecord(
                    sch.trace, wl, run_secs=[float(res.median_s)], target=target,
                    args_info=ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
                summary.exported.append({"key": key, "match": res.match, "tuned_ratio": res.tuned_ratio,
                                         "interference": res.interference, "median_s": res.median_s,
                                         "mod_hash": res.mod_hash})
        if not summary.exported:
            raise ConfigError(f"nothing to export at {ratio:g}%: "
                              + "; ".join(f"{s['key']}: {s['reason']}" for s in summary.skipped))
        for name in (WORKLOAD_FILE, RECORD_FILE):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %d configs at %g%% to %s", len(summary.exported), ratio, out)
    return summary


# ---------------------------------------------------------------- import


def import_metaschedule(db: TuningDatabase, src: Path, ratio: float, *, interference: str = "none",
                        device_id: str | None = None, partition: str | None = None,
                        workloads: Sequence[Any] | None = None) -> ImportSummary:
    """Record a MetaSchedule JSON database's records as measurements at ``ratio`` (percent).

    ``device_id``: a device already in ``db``; by default this machine (CPU for llvm records,
    the first GPU for cuda ones). Records of workloads not found (in ``db`` or ``workloads``),
    of failed runs, or whose trace does not replay are counted, not fatal. Raises ConfigError
    when ``src`` is not a MetaSchedule database.
    """
    import tvm
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from .apply import replay_trace
    from .partition import check_ratio
    from .search import mod_hash

    check_ratio(ratio)
    pw, pr = Path(src) / WORKLOAD_FILE, Path(src) / RECORD_FILE
    if not pw.is_file() or not pr.is_file():
        raise ConfigError(f"{src}: not a MetaSchedule database (needs {WORKLOAD_FILE} and {RECORD_FILE})")
    try:
        msdb = ms.database.JSONDatabase(path_workload=str(pw), path_tuning_record=str(pr), allow_missing=False)
        records = list(msdb.get_all_tuning_records())
    except Exception as e:
        raise ConfigError(f"{src}: TVM cannot read this MetaSchedule database: {e}") from None
    summary = ImportSummary(records=len(records))
    cands = {w.key: w for w in db.workloads()}
    for w in workloads or ():
        cands.setdefault(w.key, w)
    by_hash: dict[int, list] = {}
    for w in cands.values():
        m = w.ir_module()
        by_hash.setdefault(tvm_ffi.structural_hash(m), []).append((w, m))
    device = _import_device(db, device_id, records)
    summary.device_id = device["id"]
    part = partition or ("cpu" if device["kind"] == "cpu" else "mps")
    units = max(1, min(device["units"], round(ratio / 100 * device["units"])))
    for rec in records:
        mod = rec.workload.mod
        match = [w for w, m in by_hash.get(tvm_ffi.structural_hash(mod), []) if tvm_ffi.structural_equal(m, mod)]
        if not match:
            summary.unmatched += 1
            continue
        w = match[0]
        secs = [float(t) for t in (rec.run_secs or [])]
        if not secs or not all(np.isfinite(s) and 0 < s < _MS_FAILED for s in secs):
            summary.invalid += 1
            continue
        trace = tvm.ir.save_json(rec.trace.as_json())
        try:
            h = mod_hash(replay_trace(w, trace).mod)
        except Exception as e:
            log.debug("imported trace does not replay on %s: %s", w.key, e)
            summary.invalid += 1
            continue
        db.add_workload(w)
        m = Measurement(workload_key=w.key, device_id=device["id"], partition=part, ratio=norm_ratio(ratio),
                        interference=interference, mod_hash=h, trace=trace, status="ok", times=secs,
                        median_s=float(np.median(secs)), granted_units=units,
                        granted_share=units / device["units"], source="import")
        if db.record(m) is None:
            summary.duplicates += 1
        else:
            summary.imported += 1
    log.info("imported %d of %d MetaSchedule records from %s", summary.imported, summary.records, src)
    return summary


def _import_device(db: TuningDatabase, device_id: str | None, records: list) -> dict:
    if device_id:
        d = db.device(device_id)
        if d is None:
            have = ", ".join(x["id"] for x in db.devices()) or "none"
            raise ConfigError(f"no device {device_id} in {db.path} (have: {have})")
        return d
    from .device import detect_cpu, detect_cuda

    kinds = {str(r.target.kind.name) for r in records if r.target is not None} or {"llvm"}
    kind = _only({"cuda" if k == "cuda" else "cpu" for k in kinds}, "target kinds", "--device")
    dev = detect_cuda() if kind == "cuda" else detect_cpu()
    db.add_device(dev)
    return db.device(dev.id)


# ---------------------------------------------------------------- merge


def merge_databases(sources: Sequence[Path], out: Path) -> MergeSummary:
    """Merge ``sources`` into a new database at ``out`` (which must not exist).

    Written to a temporary file next to ``out`` and renamed when complete, so ``out`` is either
    absent or whole. Raises DatabaseError when a source is missing or two sources disagree on a
    workload's spec.
    """
    from .device import DeviceInfo

    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out}: already exists; merge writes a new database")
    srcs = [Path(s) for s in sources]
    for s in srcs:
        if not s.is_file():
            raise DatabaseError(f"{s}: no such database")
        if s.resolve() == out.resolve():
            raise ConfigError(f"{out}: is also a source")
    summary = MergeSummary(str(out), [str(s) for s in srcs])
    fd, tmpname = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else ".")
    os.close(fd)
    os.unlink(tmpname)
    tmp = Path(tmpname)
    try:
        with TuningDatabase(tmp, create=True) as dst:
            for s in srcs:
                with _open_readonly(s) as src:
                    for d in src.devices():
                        dst.add_device(DeviceInfo.from_dict(d))
                    for w in src.workloads():
                        dst.add_workload(w)
                    for m in src.measurements(with_features=True):
                        m.id = None
                        if dst.record(m) is None:
                            summary.duplicates += 1
                        else:
                            summary.measurements += 1
                    for b in src.baselines():
                        summary.baselines += dst.add_baseline_row(b)
            summary.devices = len(dst.devices())
            summary.workloads = len(dst.workloads())
            summary.best = len(dst.best_index_rows())
        os.replace(tmp, out)
    finally:
        for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            if p.exists():
                p.unlink()
    log.info("merged %d databases into %s: %d measurements, %d duplicates", len(srcs), out, summary.measurements,
             summary.duplicates)
    return summary


class _open_readonly:
    """A TuningDatabase over a read-only connection, so merging can never write a source."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> TuningDatabase:
        import sqlite_utils

        db = TuningDatabase.__new__(TuningDatabase)
        db.path = self.path
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                   check_same_thread=False)
            db.db = sqlite_utils.Database(conn)
            version = db.schema_version
        except sqlite3.DatabaseError as e:
            raise DatabaseError(f"{self.path}: not a spatialtune database ({e})") from None
        from .database import SCHEMA_VERSION

        if version != SCHEMA_VERSION:
            raise DatabaseError(f"{self.path}: schema v{version}, this spatialtune writes v{SCHEMA_VERSION}: "
                                "open it once with spatialtune to upgrade it, then merge")
        self.db = db
        return db

    def __exit__(self, *exc) -> None:
        self.db.close()
