"""The lookup's answers at one share written as a MetaSchedule ``JSONDatabase``, so TVM's own
pipelines (Relax's ``MetaScheduleApplyDatabase``, ``tvm.compile``) apply the configs a scheduler
would get at that share (the :mod:`spatialtune.lookup` rules: exact, else the nearest share
below, else 100 %). Importing MetaSchedule records: :mod:`spatialtune.store.metaschedule`."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..device import target_for
from ..errors import ConfigError
from ..store.database import TuningDatabase
from ..store.metaschedule import RECORD_FILE, WORKLOAD_FILE, only_one
from ..terms import norm_ratio

log = logging.getLogger(__name__)


@dataclass
class ExportSummary:
    out: str
    ratio: float
    interference: str
    exported: list[dict[str, Any]] = field(default_factory=list)  # key, match, tuned_ratio, median_s
    skipped: list[dict[str, str]] = field(default_factory=list)  # key, reason
    unchecked_left_out: int = 0  # imported rows never output-checked: no answer, so never exported

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_metaschedule(db: TuningDatabase, ratio: float, out: Path, *, interference: str = "none",
                        device_id: str | None = None, partition: str | None = None) -> ExportSummary:
    """Write the configs for ``ratio`` (percent) as a MetaSchedule JSON database under ``out``.

    Existing database files in ``out`` are replaced, atomically per file. Raises ConfigError when
    the device or partition is ambiguous or nothing can be exported.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from .service import Lookup

    if not (0 < ratio <= 100):
        raise ConfigError(f"--ratio must be a percentage in (0, 100], got {ratio!r}")
    rows = db.best_index_rows()
    if not rows:
        raise ConfigError(f"{db.path}: no tuned configs to export")
    device_id, partition, device = _export_device(db, rows, device_id, partition)
    target = tvm.target.Target(target_for(device))
    summary = ExportSummary(str(out), norm_ratio(ratio), interference)
    summary.unchecked_left_out = db.count_measurements(device_id=device_id, partition=partition,
                                                       interference=interference, status="unchecked")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        msdb = ms.database.JSONDatabase(path_workload=str(tmp / WORKLOAD_FILE),
                                        path_tuning_record=str(tmp / RECORD_FILE), allow_missing=True)
        with Lookup(db.path, check_interval_s=None, preload=True, here=[device_id]) as lk:
            for key in sorted({r.workload_key for r in rows}):
                res = lk.lookup(key, ratio=ratio, interference=interference, device=device_id, partition=partition)
                if not res.found:
                    summary.skipped.append({"key": key, "reason": res.reason})
                    continue
                _commit_answer(msdb, lk, key, db.workload(key), res, target, summary)
        if not summary.exported:
            raise ConfigError(f"nothing to export at {ratio:g}%: "
                              + "; ".join(f"{s['key']}: {s['reason']}" for s in summary.skipped))
        for name in (WORKLOAD_FILE, RECORD_FILE):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %d configs at %g%% to %s", len(summary.exported), ratio, out)
    return summary


def _export_device(db: TuningDatabase, rows: list, device_id: str | None,
                   partition: str | None) -> tuple[str, str, dict]:
    """The device and partition to export for: those given, else the only ones the best table holds."""
    device_id = device_id or only_one({r.device_id for r in rows}, "devices", "--device")
    partition = partition or only_one({r.partition for r in rows if r.device_id == device_id} or {"?"}, "partitions", "--partition")
    device = db.device(device_id)
    if device is None:
        raise ConfigError(f"no device {device_id} in {db.path}")
    return device_id, partition, device


def _commit_answer(msdb, lk, key: str, w, res, target, summary: ExportSummary) -> None:
    """The lookup's answer ``res`` for ``key`` (workload ``w``) as a MetaSchedule tuning record in
    ``msdb``; skipped, with the reason in ``summary``, when its trace does not replay."""
    from tvm.s_tir import meta_schedule as ms

    from ..workloads.schedule import apply_trace

    mod = w.ir_module()
    try:
        sch = apply_trace(w, lk.trace(res))
    except Exception as e:
        summary.skipped.append({"key": key, "reason": f"trace does not replay: {e}"})
        return
    wl = msdb.commit_workload(mod)
    msdb.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, wl, run_secs=[float(res.median_s)], target=target,
        args_info=ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
    summary.exported.append({"key": key, "match": res.match, "tuned_ratio": res.tuned_ratio,
                             "interference": res.interference, "median_s": res.median_s,
                             "mod_hash": res.mod_hash})
