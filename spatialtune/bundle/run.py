"""Run a bundle (GPU host, or this host's cores for a CPU bundle): measure its candidates under a
list of conditions with the same runner and workers as ``tune``.

Needs only a runtime-only TVM, numpy and (for GPUs) cuda-bindings: no database, no xgboost, no
compiler. ``results.json`` is rewritten after every condition, so a run cut short still leaves
what it measured.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError, DeviceError
from ..terms import Condition
from . import FORMAT
from .manifest import conditions_for, load_manifest, write_json
from .models import measure_models

log = logging.getLogger(__name__)


def conditions_from(partition: str, ratios: Sequence[float], interference: Sequence[str]) -> list[Condition]:
    return [Condition(partition, ratio=r, interference=i) for i in interference for r in ratios]


@dataclass(frozen=True)
class RunOptions:
    """How a bundle run measures: the measuring settings, how much of the pool each condition
    after the first measures (``top``) and whether the vendor baseline runs beside it."""

    repeat: int = 5
    min_repeat_ms: int = 10
    timeout: float = 20.0  # per candidate
    top: int | None = None
    seed: int = 0
    vendor: bool = True
    models: bool = True  # the bundle's whole models under each condition (bundle.models)
    model_rounds: int = 3  # interleaved rounds per condition; a variant's latency is the median
    model_min_repeat_ms: int = 50  # a variant's slot in a round runs the model at least this long
    model_warmup_ms: int = 100  # untimed runs of each variant after its check
    model_timeout: float = 120.0  # per call into the worker: a variant's load and check, one slot


def run_bundle(bundle: str, out: str, conditions: Sequence[Condition], options: RunOptions | None = None) -> dict:
    """Measure the bundle's candidates under each condition; returns (and writes) the results.

    A candidate is measured under every condition it was proposed for (``for`` in the manifest),
    whatever its speed elsewhere. ``options.top``: besides those, after the first condition
    (which should be the whole device) only each workload's ``top`` fastest candidates of the
    first condition and the configs a next round carries to be measured everywhere
    (``transfer``, ``best``) are measured; without ``top``, every candidate under every condition.

    ``options.vendor`` (CUDA only): after each condition's candidates, the same worker measures
    torch's matmul (cuBLAS: fp32 without TF32, or fp16 with fp32 accumulation) for every
    matmul/dense/batch_matmul workload, under the same share and neighbour
    (:func:`measure_vendor`), into ``results["baselines"]``. Optional: a GPU host without torch
    gives one log line and no baseline rows.

    ``options.models``: after those, every model the bundle carries runs end to end under the
    condition (:mod:`.models`) into ``results["model_runs"]``.
    """
    from ..measure.runner import LocalRunner
    from ..partitions import create_partition

    if not conditions:
        raise ConfigError("no conditions to measure")
    run = _Run(bundle, out, conditions, options or RunOptions())
    # Group by partition and keep the order given: a private MPS daemon is stopped before green
    # contexts (non-MPS clients) run.
    for kind in dict.fromkeys(c.partition_kind for c in conditions):
        part = create_partition("cpu") if run.on_cpu else create_partition(kind, total_sms=run.device.units)
        with part, LocalRunner(part, device_kind="cpu" if run.on_cpu else "cuda", settings=run.settings) as runner:
            for cond in [c for c in conditions if c.partition_kind == kind]:
                run.condition(runner, part, cond)
    return run.results


class _Run:
    """One bundle run: the manifest, the candidates still measured, and the results so far."""

    def __init__(self, bundle: str, out: str, conditions: Sequence[Condition], opt: RunOptions):
        from ..measure.runner import RunSettings

        self.man = load_manifest(bundle)
        self.root = Path(bundle).resolve()
        self.on_cpu = self.man.get("target", {}).get("kind") == "llvm"
        bad = [c.label for c in conditions if (c.partition_kind == "cpu") != self.on_cpu]
        if bad:
            raise ConfigError(f"conditions {', '.join(bad)} do not fit a bundle built for "
                              f"{'cpu (use cpu:RATIO)' if self.on_cpu else 'cuda (use mps:... or green:...)'}")
        self.device, self.register_tenant = _this_device(self.on_cpu)
        if self.device.arch != self.man["arch"]:
            raise DeviceError(f"bundle built for {self.man['arch']}, this {'host' if self.on_cpu else 'GPU'} is "
                              f"{self.device.arch}")
        _support_env(self.man, self.root)
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.root / "manifest.json", self.out / "manifest.json")
        self.settings = RunSettings(repeat=opt.repeat, min_repeat_ms=opt.min_repeat_ms, timeout=opt.timeout,
                                    seed=opt.seed)
        self.top = opt.top
        dev = self.device.to_dict() | {"tvm_version": self.man.get("tvm_version", "")}
        self.results = {"format": FORMAT, "device": dev, "bundle": str(self.root),
                        "settings": vars(self.settings) | {"top": opt.top}, "conditions": [], "measurements": [],
                        "baselines": [], "model_runs": [], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.opt, self.model_state = opt, {}
        self.cands = self.man["candidates"]
        self.pool = {c["id"] for c in self.cands}
        self.keep = {c["id"] for c in self.cands if c.get("source") in ("transfer", "best")}
        self.first = True
        self.vendor = {"off": None} if opt.vendor and not self.on_cpu else {"off": "not asked for"}
        self.t0 = time.perf_counter()

    def condition(self, runner, part, cond: Condition) -> None:
        """Measure one condition's candidates (and the vendor baseline); write the results."""
        from ..measure.runner import RunInput

        share = part.grant_sms(cond.sms) if cond.sms is not None else part.grant(cond.ratio)
        granted = Condition(cond.partition_kind, share.key_ratio, cond.interference)
        todo = [c for c in self.cands if c["status"] == "ok" and (c["id"] in self.pool or granted in conditions_for(c))]
        inputs = [RunInput(_workload(self.man, c["workload_key"], self.root), str(self.root / c["artifact"]),
                           str(self.root / c["cubin"]) if c.get("cubin") else None) for c in todo]
        t0 = time.perf_counter()
        if cond.interference.startswith("tenant:") and self.register_tenant is not None:
            _register_tenants(self.results, self.man, self.root, self.register_tenant)
        res = runner.run(share, cond.interference, inputs)
        base_row = granted.to_dict() | {"planned_units": share.units, "total_units": share.total,
                                        "condition": cond.label}
        rows = [_row(c) | base_row | r.to_dict() for c, r in zip(todo, res)]
        if self.first:
            rows += [_row(c) | base_row | {"status": "build_error", "error": c.get("error", "")}
                     for c in self.cands if c["status"] != "ok"]
        self.results["measurements"] += rows
        base = measure_vendor(runner, share, cond, self.man, self.vendor)
        self.results["baselines"] += base
        self.results["model_runs"] += measure_models(runner, share, cond, self.man, self.root, self.opt,
                                                     self.model_state)
        if self.man.get("models") and self.opt.models:
            self.results["onnxruntime"] = self.model_state.get("onnxruntime")
        summary = _condition_summary(cond, share, rows, time.perf_counter() - t0, base)
        self.results["conditions"].append(summary)
        log.info("%s", json.dumps(summary))
        if self.first and self.top:
            self.pool = set(self.keep)
            for wk in self.man["workloads"]:
                ok = sorted((r for r in rows if r["workload_key"] == wk and r["status"] == "ok"),
                            key=lambda r: r["median_s"])
                self.pool |= {r["candidate"] for r in ok[: self.top]}
        self.first = False
        self.results["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        write_json(self.out / "results.json", self.results)


def _row(c: dict) -> dict:
    return {"candidate": c["id"], "workload_key": c["workload_key"], "mod_hash": c["mod_hash"]}


def _this_device(on_cpu: bool):
    """This host's device, and how a ``tenant:`` neighbour is registered (GPU only)."""
    if on_cpu:
        from ..device import detect_cpu

        return detect_cpu(), None
    from ..device import detect_cuda
    from ..neighbours.gpu import register_tenant

    return detect_cuda(), register_tenant


def _support_env(man: dict, root: Path) -> None:
    """The bundle's neighbour cubin and green-context shim, for the measuring workers."""
    if man.get("neighbour_cubin"):
        os.environ.setdefault("SPATIALTUNE_NEIGHBOUR_CUBIN", str(root / man["neighbour_cubin"]))
    if man.get("green_shim") and (root / man["green_shim"]).exists():
        os.environ.setdefault("SPATIALTUNE_GREEN_SHIM", str(root / man["green_shim"]))


def _workload(man: dict, key: str, root: Path) -> dict:
    """The manifest's workload as a measuring worker takes it (a PrimFunc's prebuilt float64
    reference by its path on this host)."""
    w = man["workloads"][key]
    return w | {"reference_lib": str(root / w["reference_lib"])} if w.get("reference_lib") else w


def _register_tenants(results: dict, man: dict, root: Path, register) -> None:
    """``tenant:NAME`` runs the best whole-device config measured so far of workload NAME."""
    cand = {c["id"]: c for c in man["candidates"]}
    for wk, w in man["workloads"].items():
        ok = [m for m in results["measurements"] if m["workload_key"] == wk and m["status"] == "ok"
              and m["interference"] == "none"]
        if not ok:
            continue
        top_ratio = max(m["ratio"] for m in ok)
        best = min((m for m in ok if m["ratio"] == top_ratio), key=lambda m: m["median_s"])
        c = cand[best["candidate"]]
        for name in {wk, w.get("name") or wk}:
            register(name, {k: w[k] for k in ("op", "dtype", "params", "name", "model", "prim", "weight") if k in w},
                     str(root / c["artifact"]),
                     str(root / c["cubin"]) if c.get("cubin") else None)


def measure_vendor(runner, share, cond: Condition, man: dict, state: dict) -> list[dict]:
    """cuBLAS (torch's matmul) for each matmul-like workload of ``man``, in ``runner``'s worker for
    ``share``, next to ``cond``'s neighbour. Never raises for a missing or failing torch: a row
    with that status (and a log line); ``state["off"]`` set once torch is missing, or once the
    baseline hung or crashed (it would at every condition), so later conditions skip it."""
    from ..measure.runner import metered_call
    from ..measure.vendor import VENDOR_OPS
    from ..neighbours import create_neighbour

    if state.get("off"):
        return []
    wks = [(wk, w) for wk, w in man["workloads"].items() if w.get("op") in VENDOR_OPS]
    if not wks:
        return []
    out = []
    worker = runner.worker_for(share)
    neighbour = create_neighbour(cond.interference, partition=runner.partition, device_kind=runner.device_kind)
    with neighbour.running(share) as meter:
        for wk, w in wks:
            r = metered_call(worker, meter, max(45.0, 2 * runner.settings.timeout),  # the first call imports torch
                             "spatialtune.measure.vendor:measure_torch", w, runner.settings, runner.next_seed())
            row = {"workload_key": wk, "kind": "cublas", "partition": cond.partition_kind, "ratio": share.key_ratio,
                   "planned_units": share.units, "total_units": share.total, "interference": cond.interference,
                   "condition": cond.label} | r
            out.append(row)
            if r["status"] == "ok":
                log.info("cuBLAS %s %s: %.1f us (%s SMs seen, rel err %.2g)", wk, cond.label, r["median_s"] * 1e6,
                         r.get("granted_units"), r.get("rel_err") or 0.0)
            else:
                log.warning("cuBLAS baseline %s %s: %s: %s", wk, cond.label, r["status"], r.get("error", ""))
            if r["status"] == "unavailable":
                state["off"] = r.get("error") or "unavailable"
            elif r["status"] == "timeout" or "worker died" in r.get("error", ""):
                # a hang or a crash would repeat at every condition: stop asking
                state["off"] = f"the baseline {r['status']} at {cond.label}"
            if state.get("off"):
                log.warning("no more cuBLAS baselines in this run (%s); the candidates are measured as before",
                            state["off"])
                break
    return out


def _condition_summary(cond: Condition, share, rows: list[dict], elapsed: float,
                       baselines: Sequence[dict] = ()) -> dict:
    import numpy as np

    out = {"condition": cond.label, "partition": cond.partition_kind, "ratio": share.key_ratio,
           "planned_units": share.units, "interference": cond.interference, "elapsed_s": round(elapsed, 1),
           "workloads": {}}
    for wk in sorted({r["workload_key"] for r in rows}):
        rs = [r for r in rows if r["workload_key"] == wk]
        ok = [r for r in rs if r["status"] == "ok"]
        seen = sorted({r["granted_units"] for r in rs if r.get("granted_units")})
        nb = [r["neighbour_throughput"] for r in rs if r.get("neighbour_throughput")]
        loads = [r["load_s"] for r in rs if r.get("load_s") is not None]
        best = min(ok, key=lambda r: r["median_s"]) if ok else None
        out["workloads"][wk] = {
            "measured": len(rs), "ok": len(ok), "statuses": {s: sum(r["status"] == s for r in rs)
                                                            for s in sorted({r["status"] for r in rs})},
            "best": best and best["candidate"], "best_s": best and best["median_s"], "sms_seen": seen,
            "max_rel_err": max((r["rel_err"] for r in ok if r.get("rel_err") is not None), default=None),
            "median_load_s": float(np.median(loads)) if loads else None,
            "neighbour": float(np.median(nb)) if nb else None,
            "neighbour_unit": next((r["neighbour_unit"] for r in rs if r.get("neighbour_unit")), ""),
            "cublas_s": next((b["median_s"] for b in baselines if b["workload_key"] == wk and b["status"] == "ok"),
                             None)}
    return out
