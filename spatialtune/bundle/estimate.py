"""How long a bundle run will hold the device, per part, before it starts.

A GPU host is lent for minutes, so ``scripts/gpu-check`` prints this estimate first and refuses a
run that would not fit its budget (rather than measuring a part of the conditions and leaving the
rest for a window that may not come). The estimate is counts from the manifest times seconds per
unit of work (:class:`DeviceCosts`): the kernels' from the H200 rounds recorded in
``docs/gpu-check-results.md``, the models' a deliberate overestimate until a GPU has run them.
It never reads the device, so it runs on either host.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceCosts:
    """Seconds per unit of device work (see docs/gpu-check-results.md for where each comes from)."""

    setup_s: float = 17.0  # once: the carried wheel installed, imports checked, the shim built
    condition_s: float = 5.0  # per condition: the worker's CUDA context, the MPS client or green context, neighbour
    load_s: float = 0.001  # per candidate and condition: its cubin loaded
    kernel_s: float = 0.12  # per candidate and condition: output check, warm-up, timed repeats
    vendor_first_s: float = 6.0  # per condition with a vendor baseline: torch imported in the worker
    vendor_s: float = 0.5  # per matmul-like workload and condition
    model_load_s: float = 3.0  # per model variant and condition: library, weights, check, warm-up
    onnxruntime_load_s: float = 5.0  # per model and condition: an ONNX Runtime session on the device
    slot_overhead_s: float = 0.02  # per slot of a model's round, besides its minimum length


H200 = DeviceCosts()

VENDOR_OPS = ("matmul", "dense", "batch_matmul")  # what the vendor baseline measures (measure.vendor)


@dataclass(frozen=True)
class RunPlan:
    """What a run will do: how many conditions, and which of the run's parts it includes."""

    conditions: int
    top: int | None = None
    vendor: bool = True
    models: bool = True
    onnxruntime: bool = True  # whether to count ONNX Runtime as a model variant (unknown before the run)
    model_rounds: int = 3
    model_min_repeat_ms: int = 50


def kernels_per_condition(man: dict, top: int | None) -> tuple[int, int]:
    """(candidates measured under the first condition, under each later one): after the first,
    each workload's ``top`` fastest plus the configs a next round keeps measuring everywhere."""
    ok = [c for c in man.get("candidates", []) if c.get("status") == "ok"]
    if not top:
        return len(ok), len(ok)
    keep = sum(c.get("source") in ("transfer", "best") for c in ok)
    per_wl: dict[str, int] = {}
    for c in ok:
        per_wl[c["workload_key"]] = per_wl.get(c["workload_key"], 0) + 1
    return len(ok), min(len(ok), sum(min(n, top) for n in per_wl.values()) + keep)


def model_variants(model: dict) -> int:
    """Libraries of a model timed under one condition: the whole device's, and a share's own
    where one was compiled."""
    return 1 + any(v.get("variant") == "share-tuned" and not v.get("same_as") for v in model.get("variants", []))


def estimate(man: dict, plan: RunPlan, costs: DeviceCosts = H200) -> dict[str, float]:
    """Seconds per part (``load``, ``measure``, ``vendor``, ``models``), their ``total``, and
    ``run``: the measuring run alone (the total less the setup before it), what a run's time
    limit cuts."""
    if plan.conditions < 1:
        return {"load": costs.setup_s, "measure": 0.0, "vendor": 0.0, "models": 0.0, "total": costs.setup_s,
                "run": 0.0}
    first, later = kernels_per_condition(man, plan.top)
    measured = first + later * (plan.conditions - 1)
    on_gpu = man.get("target", {}).get("kind") == "cuda"
    vendor_wl = sum(w.get("op") in VENDOR_OPS for w in man.get("workloads", {}).values())
    parts = {"load": costs.setup_s + measured * costs.load_s,
             "measure": plan.conditions * costs.condition_s + measured * costs.kernel_s,
             "vendor": plan.conditions * (costs.vendor_first_s + vendor_wl * costs.vendor_s)
             if plan.vendor and on_gpu and vendor_wl else 0.0,
             "models": 0.0}
    if plan.models:
        slot = plan.model_min_repeat_ms / 1e3 + costs.slot_overhead_s
        for m in man.get("models", []):
            n = model_variants(m)
            per = n * (costs.model_load_s + plan.model_rounds * slot)
            if plan.onnxruntime:
                per += costs.onnxruntime_load_s + plan.model_rounds * slot
            parts["models"] += plan.conditions * per
    parts = {k: round(v, 1) for k, v in parts.items()}
    parts["total"] = round(sum(parts.values()), 1)
    parts["run"] = round(parts["total"] - costs.setup_s, 1)
    return parts


def format_estimate(parts: dict[str, float], budget: float | None = None) -> str:
    line = ", ".join(f"{k} {parts[k]:.0f} s" for k in ("load", "measure", "vendor", "models"))
    return f"device-time estimate: {line}; total {parts['total']:.0f} s, of which the measuring run " \
        f"{parts['run']:.0f} s" + (f" (its budget {budget:.0f} s)" if budget is not None else "")
