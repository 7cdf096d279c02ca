"""Import a bundle run (CPU host): every measurement into the tuning database and the vendor
baselines beside them. The outputs were checked on the GPU host: a wrong kernel comes back as
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
            "keys": sorted(keys, key=lambda k: (k.partition_kind, k.ratio, k.interference)), "baselines": baselines}
