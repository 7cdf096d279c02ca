"""Baselines under the same share and neighbour as the tuned kernels: TVM's untuned default and,
on a CPU, numpy (BLAS), each measured once per tuning key and stored with the measurements."""

from __future__ import annotations

import logging

from ..measure.builder import BuildInput, LocalBuilder
from ..measure.runner import Runner
from ..search.space import default_candidate
from ..store.database import TuningDatabase
from ..terms import Share

log = logging.getLogger(__name__)


def measure_baselines(db: TuningDatabase, builder: LocalBuilder, runner: Runner, workload, share: Share,
                      key: dict, target: dict) -> None:
    have = {b["kind"] for b in db.baselines(**key)}
    # numpy has no counterpart of a fused PrimFunc from a model: its baseline is TVM's default only.
    kinds = [k for k in ("tvm-default", "numpy") if k not in have
             and not (k == "numpy" and (target["kind"] != "llvm" or workload.prim is not None))]
    interference = key["interference"]
    for kind in kinds:
        artifact = None
        if kind == "tvm-default":
            c = default_candidate(workload, target)
            b = builder.build([BuildInput(c.mod_json, "default-" + c.mod_hash, mod_hash=c.mod_hash)], target)[0]
            if not b.ok:
                log.warning("default schedule of %s did not build: %s", workload.key, b.error)
                continue
            artifact = b.artifact
            res = runner.measure_baseline(share, interference, workload.to_dict(), kind, artifact, b.cubin)
        else:
            res = runner.measure_baseline(share, interference, workload.to_dict(), kind)
        if res.status == "ok":
            db.record_baseline(**key, kind=kind, median_s=res.median_s, granted_units=res.granted_units or share.units)
        else:
            log.warning("%s baseline of %s at %g%%: %s %s", kind, workload.key, key["ratio"], res.status, res.error)
