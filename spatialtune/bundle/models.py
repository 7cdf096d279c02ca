"""Whole models on the device (``bundle run``): each model of the bundle end to end under each
condition, in the worker that holds the condition's share, next to its neighbour.

Per condition and model the variants are the library compiled for this share (``share-tuned``;
the whole device's where the share was never tuned, then marked ``same_as``), the one compiled
with the whole device's records (``whole-tuned``), and ONNX Runtime on the device where this
python has it (its CUDA provider on a GPU, the CPU one for a CPU bundle; otherwise the results
say it was not available). As on the CPU (:mod:`spatialtune.models.e2e`), every variant is
loaded and checked once, then all are timed in interleaved rounds (A B C, A B C, ...) so that a
drifting device drifts under every variant alike; a variant's latency is the median of its
rounds. The worker side is :mod:`spatialtune.measure.model_slots`; rows go to
``results["model_runs"]`` and ``bundle import`` records them as ``model_runs``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..measure.worker import WorkerError
from ..terms import norm_ratio

log = logging.getLogger(__name__)

_S = "spatialtune.measure.model_slots"


def pick_variants(model: dict, partition: str, key_ratio: float) -> dict[str, dict]:
    """The model's ``whole-tuned`` and ``share-tuned`` libraries for a condition's share (in that
    order: a share-tuned library that is the whole device's is timed as the whole-tuned one)."""
    vs = model["variants"]
    whole = next((v for v in vs if v["partition"] == partition and v["ratio"] == 100.0), None) \
        or next(v for v in vs if v["variant"] == "whole-tuned")
    here = next((v for v in vs if v["partition"] == partition and norm_ratio(v["ratio"]) == norm_ratio(key_ratio)),
                whole)
    return {"whole-tuned": whole, "share-tuned": here}


def measure_models(runner, share, cond, man: dict, root: Path, opt, state: dict) -> list[dict]:
    """Rows of every model of ``man`` under ``cond`` (see the module doc); ``state`` keeps what a
    run learns once (whether ONNX Runtime is there)."""
    from ..neighbours import create_neighbour

    if not man.get("models") or not opt.models:
        return []
    on_cpu = runner.device_kind == "cpu"
    worker = runner.worker_for(share)
    provider = _onnxruntime(worker, opt, state, on_cpu)
    neighbour = create_neighbour(cond.interference, partition=runner.partition, device_kind=runner.device_kind)
    rows: list[dict] = []
    with neighbour.running(share):
        for m in man["models"]:
            rows += _model(worker, m, share, cond, root, opt, provider, on_cpu)
    return rows


def _onnxruntime(worker, opt, state: dict, on_cpu: bool) -> str | None:
    """ONNX Runtime's provider for this device in the worker's python, or None (the reason in
    ``state["onnxruntime"]``)."""
    if "provider" not in state:
        want = "CPUExecutionProvider" if on_cpu else "CUDAExecutionProvider"
        r = _call(worker, opt, "onnxruntime_providers")
        if r["status"] != "ok":
            state["provider"], state["onnxruntime"] = None, f"not available: {r.get('error', '')}"
        elif want not in r["providers"]:
            state["provider"] = None
            state["onnxruntime"] = f"not available: onnxruntime {r['version']} has no {want} " \
                                   f"({', '.join(r['providers'])})"
        else:
            state["provider"], state["onnxruntime"] = want, f"onnxruntime {r['version']} {want}"
        log.info("models: ONNX Runtime %s", state["onnxruntime"])
    return state["provider"]


def _model(worker, m: dict, share, cond, root: Path, opt, provider: str | None, on_cpu: bool) -> list[dict]:
    picked = pick_variants(m, cond.partition_kind, share.key_ratio)
    spec = {"device": "cpu" if on_cpu else "cuda", "inputs": m["inputs"], "params": m["params"], "seed": m["seed"],
            "reference": str(root / m["reference"]), "strides": m["strides"]}
    loads, same = [], {}
    for name, v in picked.items():
        first = next((n for n, args in loads if args[0] == str(root / v["file"])), None)
        if first is not None:
            same[name] = first
        else:
            loads.append((name, (str(root / v["file"]), spec)))
    if provider:
        loads.append(("onnxruntime", (str(root / m["skeleton"]), spec | {"provider": provider,
                                                                          "threads": share.units if on_cpu else 0})))
    res = interleave(worker, opt, loads)
    base = {"model": m["name"], "model_hash": m["hash"], "partition": cond.partition_kind, "ratio": share.key_ratio,
            "planned_units": share.units, "interference": cond.interference, "condition": cond.label,
            "n_tasks": m["n_tasks"]}
    rows = []
    for name in [*picked, *(["onnxruntime"] if provider else [])]:
        r = res[same.get(name, name)]
        v = picked.get(name)
        detail = {"condition": cond.label, "interference": cond.interference, "load_s": r.get("load_s"),
                  "weights": f"{len(m['params'])} drawn from seed {m['seed']}", "rounds": len(r.get("times", []))}
        if v is not None:
            detail |= {"file": v["file"], "variant_id": v["id"], "tasks": v["tasks"]}
            if v.get("same_as") or name in same:
                detail["same_as"] = same.get(name) or v["same_as"]
        else:
            detail |= {"provider": provider, "version": r.get("version")}
        rows.append(base | {"variant": name, "status": r["status"], "error": r.get("error", ""),
                            "latency_s": r.get("median_s"), "times": r.get("times", []), "rel_err": r.get("rel_err"),
                            "granted_units": r.get("granted_units"),
                            "tuned_tasks": v["tuned_tasks"] if v else None, "detail": detail})
        log.info("model %s %s %s: %s %s", m["name"], cond.label, name, r["status"],
                 f"{r['median_s'] * 1e3:.3f} ms" if r.get("median_s") else r.get("error", ""))
    _call(worker, opt, "unload", None)
    return rows


def interleave(worker, opt, loads: list[tuple[str, tuple]]) -> dict[str, dict]:
    """Load every variant of ``loads`` ((name, (library or skeleton, spec))) in the worker, then
    time them in ``opt.model_rounds`` round-robin slots; per variant its load's answer with
    ``times`` (one per round) and ``median_s``. A call that kills the worker fails its variant;
    the others are loaded again into the fresh process and go on."""
    out: dict[str, dict] = {}
    settings = {"min_repeat_ms": opt.model_min_repeat_ms, "warmup_ms": opt.model_warmup_ms}

    def loader(name: str) -> str:
        return "load_onnxruntime" if name == "onnxruntime" else "load_vm"

    def call(name: str, fn: str, *args) -> dict:
        pid = worker.pid
        res = _call(worker, opt, fn, *args)
        if worker.pid != pid:  # a fresh process: the variants loaded in the old one are gone
            for n, a in loads:
                if n != name and out.get(n, {}).get("status") == "ok":
                    again = _call(worker, opt, loader(n), n, *a, settings)
                    if again["status"] != "ok":
                        out[n] |= {"status": "error", "error": f"loading again after {name} failed: {again['error']}"}
        return res

    for name, args in loads:
        out[name] = call(name, loader(name), name, *args, settings) | {"times": []}
    for k in range(opt.model_rounds):
        for name, _ in loads:
            if out[name]["status"] == "ok":
                res = call(name, "time_slot", name, settings)
                if res["status"] == "ok":
                    out[name]["times"].append(res["time_s"])
                else:
                    out[name] |= {"status": "error", "error": f"round {k + 1}: {res['error']}"}
    for r in out.values():
        if r["status"] == "ok" and r["times"]:
            r["median_s"] = float(np.median(r["times"]))
    return out


def _call(worker, opt, fn: str, *args) -> dict:
    try:
        if not worker.alive:
            worker.start()
        return {"status": "ok"} | dict(worker.call(f"{_S}:{fn}", *args, timeout=opt.model_timeout) or {})
    except WorkerError as e:
        if worker.alive and e.kind == "error":
            worker.restart()  # nobody vouches for the state of a process whose call raised
        return {"status": "error", "error": str(e)}
