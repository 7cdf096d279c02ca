"""Apply: turn a lookup answer into a runnable kernel.

:func:`build_kernel` replays the stored MetaSchedule trace on the workload's unscheduled TIR and
compiles it with ``tvm.compile``; the result holds the runtime module (``kernel.func(*args,
out)``) and the facts of the config it came from. :func:`check_kernel` runs it once on random
inputs against the workload's float64 reference, the same check the tuner applied before
timing it. A miss (``result.found`` False) builds TVM's untuned default schedule, so a caller
always gets a kernel; ``kernel.tuned`` says which it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, DatabaseError

log = logging.getLogger(__name__)


@dataclass
class Kernel:
    """A compiled kernel. ``executable`` is what ``tvm.compile`` returned; ``func`` its entry."""

    workload: Any  # spec.Workload
    executable: Any
    target: dict
    tuned: bool  # False: TVM's default schedule (the lookup missed)
    mod_hash: str | None
    tuned_ratio: float | None

    @property
    def func(self):
        return self.executable.mod["main"]

    def export_library(self, path: str) -> None:
        self.executable.export_library(path)


def build_kernel(result, workload, trace: str | None, *, target: dict | None = None) -> Kernel:
    """Compile the config a :class:`~spatialtune.lookup.LookupResult` names.

    ``workload``: the spec.Workload of ``result.workload_key`` (``TuningDatabase.workload``);
    ``trace``: ``Lookup.trace(result)``. ``target`` defaults to this machine's CPU (every core)
    for a CPU config. Raises DatabaseError when a found config's trace is missing or no longer
    replays (another TVM version), ConfigError for a mismatched workload.
    """
    import tvm

    from ..device import detect_cpu, target_for
    from ..workloads.schedule import apply_trace, mod_hash

    if result.workload_key is not None and workload.key != result.workload_key:
        raise ConfigError(f"workload {workload.key} does not match the lookup answer for {result.workload_key}")
    if target is None:
        if (result.device_id or "").startswith("cuda"):
            raise ConfigError("a GPU config needs its target: pass target=spatialtune.device.target_for(device)")
        target = target_for(detect_cpu())
    if result.found:
        if not trace:
            raise DatabaseError(f"config {result.measurement_id} of {result.workload_key} has no stored trace")
        try:
            sch = apply_trace(workload, trace)
        except Exception as e:
            raise DatabaseError(f"stored trace of {result.workload_key} (measurement {result.measurement_id}) "
                                f"does not replay with this TVM: {e}") from None
        mod = sch.mod
        if result.mod_hash and mod_hash(mod) != result.mod_hash:
            log.warning("%s: replayed kernel hash %s differs from the measured %s", result.workload_key,
                        mod_hash(mod), result.mod_hash)
    else:
        log.info("%s: lookup missed (%s); building TVM's default schedule", result.workload, result.reason)
        mod = workload.ir_module()
    from ..workloads.prefetch import before_compile

    # As the tuner built it: fast math for a task that uses it, prefetches on a CPU.
    exe = tvm.compile(before_compile(mod, target, workload.fast_math), target=tvm.target.Target(target))
    return Kernel(workload, exe, target, result.found, result.mod_hash if result.found else None,
                  result.tuned_ratio)


def check_kernel(kernel: Kernel, *, seed: int = 0) -> float:
    """Run ``kernel`` once on random inputs; return its relative error against the float64
    reference. Raises ConfigError when it exceeds the operator's tolerance."""
    import tvm

    from ..workloads.check import check_output

    w = kernel.workload
    dev = tvm.cuda(0) if kernel.target.get("kind") == "cuda" else tvm.cpu(0)
    xs = w.random_inputs(np.random.default_rng(seed))
    refs = w.reference(xs)
    args = [tvm.runtime.tensor(x, dev) for x in xs]
    outs = [tvm.runtime.tensor(o, dev) for o in w.poisoned_outputs()]
    kernel.func(*args, *outs)
    dev.sync()
    worst = 0.0
    for out, ref in zip(outs, refs):
        err, wrong = check_output(out.numpy(), ref, w.dtype)
        if wrong:
            raise ConfigError(f"{w.key}: {wrong}")
        worst = max(worst, err)
    return worst
