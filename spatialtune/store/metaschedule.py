"""MetaSchedule records into the tuning database (the export is :mod:`spatialtune.lookup.metaschedule`).

- :func:`import_metaschedule` takes a MetaSchedule database as measurements at a given share
  (status ``unchecked``, source ``import``): MetaSchedule timed them without comparing the
  output with a reference, so they are no answer yet. Tuning that share measures them first,
  with the output check, and the checked measurement replaces the imported one; until then the
  lookup serves them only when asked to (``include_unchecked``). Records are matched to
  workloads structurally (as MetaSchedule matches them), against the database's workloads plus
  any given.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError
from ..terms import check_ratio, norm_ratio
from .database import Measurement, TuningDatabase

log = logging.getLogger(__name__)

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
_MS_FAILED = 1e9  # MetaSchedule stores 1e10 s as the time of a failed run


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


def only_one(values: set[str], what: str, flag: str) -> str:
    if len(values) != 1:
        raise ConfigError(f"the database holds several {what} ({', '.join(sorted(values))}): pass {flag}")
    return next(iter(values))


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
    check_ratio(ratio)
    records = _read_records(src)
    summary = ImportSummary(records=len(records))
    by_hash = _workloads_by_hash(db, workloads)
    device = _import_device(db, device_id, records)
    summary.device_id = device["id"]
    part = partition or ("cpu" if device["kind"] == "cpu" else "mps")
    units = max(1, min(device["units"], round(ratio / 100 * device["units"])))
    for rec in records:
        replayed = _replay(rec, by_hash, summary)
        if replayed is None:
            continue
        w, trace, secs, h = replayed
        db.add_workload(w)
        m = Measurement(workload_key=w.key, device_id=device["id"], partition=part, ratio=norm_ratio(ratio),
                        interference=interference, mod_hash=h, trace=trace, status="unchecked", times=secs,
                        median_s=float(np.median(secs)), granted_units=units,
                        granted_share=units / device["units"], source="import")
        if db.record(m) is None:
            summary.duplicates += 1
        else:
            summary.imported += 1
    log.info("imported %d of %d MetaSchedule records from %s", summary.imported, summary.records, src)
    return summary


def _read_records(src: Path) -> list:
    """The tuning records of the MetaSchedule JSON database in ``src``."""
    from tvm.s_tir import meta_schedule as ms

    pw, pr = Path(src) / WORKLOAD_FILE, Path(src) / RECORD_FILE
    if not pw.is_file() or not pr.is_file():
        raise ConfigError(f"{src}: not a MetaSchedule database (needs {WORKLOAD_FILE} and {RECORD_FILE})")
    try:
        msdb = ms.database.JSONDatabase(path_workload=str(pw), path_tuning_record=str(pr), allow_missing=False)
        return list(msdb.get_all_tuning_records())
    except Exception as e:
        raise ConfigError(f"{src}: TVM cannot read this MetaSchedule database: {e}") from None


def _workloads_by_hash(db: TuningDatabase, workloads: Sequence[Any] | None) -> dict[int, list]:
    """The candidate workloads (the database's, then those given) by their IRModule's structural
    hash, each with its module: records are matched to them as MetaSchedule matches them."""
    import tvm_ffi

    cands = {w.key: w for w in db.workloads()}
    for w in workloads or ():
        cands.setdefault(w.key, w)
    by_hash: dict[int, list] = {}
    for w in cands.values():
        m = w.ir_module()
        by_hash.setdefault(tvm_ffi.structural_hash(m), []).append((w, m))
    return by_hash


def _replay(rec, by_hash: dict[int, list], summary: ImportSummary):
    """(workload, trace JSON, run times, the scheduled module's hash) for a record that matches a
    workload, ran and replays; None for one that does not, counted in ``summary``."""
    import tvm
    import tvm_ffi

    from ..workloads.schedule import apply_trace, mod_hash

    mod = rec.workload.mod
    match = [w for w, m in by_hash.get(tvm_ffi.structural_hash(mod), []) if tvm_ffi.structural_equal(m, mod)]
    if not match:
        summary.unmatched += 1
        return None
    w = match[0]
    secs = [float(t) for t in (rec.run_secs or [])]
    if not secs or not all(np.isfinite(s) and 0 < s < _MS_FAILED for s in secs):
        summary.invalid += 1
        return None
    trace = tvm.ir.save_json(rec.trace.as_json())
    try:
        h = mod_hash(apply_trace(w, trace).mod)
    except Exception as e:
        log.debug("imported trace does not replay on %s: %s", w.key, e)
        summary.invalid += 1
        return None
    return w, trace, secs, h


def _import_device(db: TuningDatabase, device_id: str | None, records: list) -> dict:
    if device_id:
        d = db.device(device_id)
        if d is None:
            have = ", ".join(x["id"] for x in db.devices()) or "none"
            raise ConfigError(f"no device {device_id} in {db.path} (have: {have})")
        return d
    from ..device import detect_cpu, detect_cuda

    kinds = {str(r.target.kind.name) for r in records if r.target is not None} or {"llvm"}
    kind = only_one({"cuda" if k == "cuda" else "cpu" for k in kinds}, "target kinds", "--device")
    dev = detect_cuda() if kind == "cuda" else detect_cpu()
    db.add_device(dev)
    return db.device(dev.id)
