"""Import a bundle run (CPU host): every measurement into the tuning database, the vendor
baselines beside them, and the whole models' end-to-end runs as ``model_runs``. The outputs were checked on the GPU host: a wrong kernel comes back as
``wrong_result`` and is recorded as such, never as a time. The next ``tune`` (a next round)
retrains the cost models from these rows; ``spatialtune bundle import`` retrains the touched
shares' models at once (:func:`spatialtune.tuning.models.retrain`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..device import DeviceInfo
from ..errors import ConfigError
from ..store.database import Measurement
from ..terms import Condition
from ..workloads.spec import Workload
from .manifest import load_manifest, load_results


def import_results(results_path: str, db) -> dict:
    """Record a bundle run in ``db`` (a TuningDatabase); returns counts, the device and the
    conditions it touched (``keys``, :class:`~spatialtune.terms.Condition`)."""
    res = load_results(results_path)
    rdir = Path(results_path) if Path(results_path).is_dir() else Path(results_path).parent
    man_p = rdir / "manifest.json"
    man = json.loads(man_p.read_text()) if man_p.exists() else load_manifest(res["bundle"])
    dev = DeviceInfo.from_dict(res["device"])
    if dev.kind not in ("cuda", "cpu") or not dev.units:
        raise ConfigError(f"{results_path}: the results do not describe a GPU (or this host's CPU)")
    db.add_device(dev)
    for w in man["workloads"].values():
        db.add_workload(Workload.from_dict(w))
    cand = {c["id"]: c for c in man["candidates"]}
    added = skipped = 0
    keys = set()
    for m in res["measurements"]:
        c = cand.get(m["candidate"])
        if c is None:
            raise ConfigError(f"{results_path}: measurement of unknown candidate {m['candidate']!r}")
        total = m.get("total_units") or dev.units
        units = m.get("granted_units") or m.get("planned_units")
        cond = Condition.of(m)
        meas = Measurement(
            workload_key=m["workload_key"], device_id=dev.id, **cond.to_dict(), mod_hash=c["mod_hash"], trace=c["trace"], status=m["status"],
            error=m.get("error", ""), times=m.get("times") or [], median_s=m.get("median_s"),
            rel_err=m.get("rel_err"), granted_units=units, granted_share=(units / total) if units else None,
            neighbour_throughput=m.get("neighbour_throughput"), neighbour_unit=m.get("neighbour_unit", ""),
            build_s=c.get("build_s"), run_s=m.get("run_s"), search_s=c.get("search_s"),
            features=None if c.get("features") is None else np.asarray(c["features"], dtype=np.float32),
            source="bundle")
        if db.record(meas) is None:
            skipped += 1
        else:
            added += 1
        keys.add(cond)
    baselines = 0
    for b in res.get("baselines", []):  # the vendor baseline under the same share and neighbour
        if b.get("status") != "ok" or not b.get("median_s"):
            continue
        if b["workload_key"] not in man["workloads"]:
            raise ConfigError(f"{results_path}: baseline of unknown workload {b['workload_key']!r}")
        db.record_baseline(b["workload_key"], dev.id, b["partition"], b["ratio"], b["interference"],
                           b.get("kind") or "cublas", b["median_s"], b.get("granted_units"))
        baselines += 1
    return {"device_id": dev.id, "device": dev.name, "units": dev.units, "added": added, "skipped": skipped,
            "keys": sorted(keys, key=lambda k: (k.partition_kind, k.ratio, k.interference)),
            "baselines": baselines, "model_runs": _model_runs(res, dev, db)}


def _model_runs(res: dict, dev: DeviceInfo, db) -> int:
    """The whole models' rows as ``model_runs`` of this device, once: a run already imported (its
    id is the results' start time) is not recorded again."""
    from ..store.model_runs import VARIANTS, ModelRun, model_runs, record_model_run

    rows = res.get("model_runs") or []
    run = f"bundle-{res.get('started', '')}-{dev.id}"
    if not rows or any(r.run == run for r in model_runs(db)):
        return 0
    for r in rows:
        if r.get("variant") not in VARIANTS:
            raise ConfigError(f"model run of unknown variant {r.get('variant')!r} (known: {', '.join(VARIANTS)})")
        record_model_run(db, ModelRun(
            run=run, model=r["model"], model_hash=r["model_hash"], device_id=dev.id, partition=r["partition"],
            ratio=r["ratio"], variant=r["variant"], status=r["status"], granted_units=r.get("granted_units"),
            error=r.get("error", ""), latency_s=r.get("latency_s"), times=r.get("times") or [],
            rel_err=r.get("rel_err"), tuned_tasks=r.get("tuned_tasks"), n_tasks=r.get("n_tasks"),
            detail=r.get("detail") or {}))
    return len(rows)
