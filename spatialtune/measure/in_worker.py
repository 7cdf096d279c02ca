"""The measuring worker's side: hold the share, then check and time one kernel per call.

For each candidate the worker loads the artifact (a cubin on CUDA: no compile at load), draws
fresh random inputs, fills the outputs with NaN, runs the kernel once and compares every output
with the float64 reference (:mod:`spatialtune.workloads.check`; an operator's numpy reference, or
a PrimFunc's untuned module run in float64, see :mod:`spatialtune.workloads.prim`): a wrong kernel
is ``wrong_result`` and is never timed. Then it times the kernel (warm-up, the median of ``repeat`` timed runs).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..terms import Share

if TYPE_CHECKING:
    from .runner import RunSettings

_state: dict[str, Any] = {}


def init_measure_worker(partition_kind: str, share: Share, device_kind: str) -> int | None:
    """Apply the share inside this worker; return the units it sees (cores or SMs)."""
    from ..partitions import create_partition
    from . import blas

    # References on one BLAS thread: BLAS threads spinning after a reference slowed the kernel
    # timed right after it (see measure.blas); the numpy baseline takes the share's threads itself.
    blas.set_threads(1)
    part = create_partition(partition_kind) if partition_kind == "cpu" else None
    seen = part.enter(share) if part is not None else None
    if device_kind == "cuda":
        from .cuda_worker import enter_cuda_worker

        seen = enter_cuda_worker(partition_kind, share)
    _state.update(device_kind=device_kind, seen=seen, share=share)
    return seen


def warm_up(call, ms: float) -> None:
    """Untimed calls of ``call`` for ``ms`` milliseconds (none for 0): the same warm-up for a
    kernel and for the vendor baseline it is compared with."""
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        call()


def slot_time(call, min_repeat_ms: float) -> float:
    """Time per call of ``call`` over one slot of an interleaved round: one untimed call (the
    variant before it evicted this one's data from the caches), then whole calls for at least
    ``min_repeat_ms`` (at least one). A compiled model's and ONNX Runtime's slots alike."""
    call()
    return looped_time(call, min_repeat_ms)


def looped_time(call, min_repeat_ms: float) -> float:
    """Seconds per call of ``call``, run back to back for at least ``min_repeat_ms`` (at least once)."""
    n, t0 = 0, time.perf_counter()
    while True:
        call()
        n += 1
        el = time.perf_counter() - t0
        if el * 1e3 >= min_repeat_ms:
            return el / n


def share_cores() -> tuple[int, ...] | None:
    """The cores of this worker's CPU share (None outside a CPU share). The calling thread itself is
    bound to the first of them (see CpuPartition.enter), so a library that starts its own threads
    from here must be given these."""
    share = _state.get("share")
    return tuple(share.cores) if share is not None and share.cores else None


def granted_units() -> int | None:
    """The cores or SMs this worker's kernels can use, as read when the share was applied."""
    return _state.get("seen")


def _device():
    import tvm

    return tvm.cuda(0) if _state.get("device_kind") == "cuda" else tvm.cpu(0)


def _load(artifact: str, cubin: str | None):
    if _state.get("device_kind") == "cuda":
        from ..cuda.tvm_runtime import load_module

        return load_module(artifact, cubin)
    import tvm

    return tvm.runtime.load_module(artifact)


def measure_one(workload: dict, artifact: str, cubin: str | None, settings: RunSettings, seed: int) -> dict:
    """Check then time one kernel in this worker. Returns MeasureResult fields."""
    import tvm

    from ..workloads.check import check_output
    from ..workloads.spec import Workload

    w = Workload.from_dict(workload)
    dev = _device()
    t0 = time.perf_counter()
    mod = _load(artifact, cubin)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    xs = w.random_inputs(rng)
    # A PrimFunc's reference is its untuned module in float64, compiled here once per task, or
    # the library a bundle built for it on its CPU host (this host may have no compiler).
    refs = w.reference(xs, workload.get("reference_lib"))
    args = [tvm.runtime.tensor(x, dev) for x in xs]
    outs = [tvm.runtime.tensor(o, dev) for o in w.poisoned_outputs()]
    f = mod["main"]
    f(*args, *outs)
    dev.sync()
    err, wrong = 0.0, None
    for i, (out, ref) in enumerate(zip(outs, refs)):
        e, bad = check_output(out.numpy(), ref, w.dtype)
        err = max(err, e)
        if bad and wrong is None:
            wrong = bad if len(outs) == 1 else f"output {i}: {bad}"
    res = {"granted_units": _state.get("seen"), "load_s": load_s, "rel_err": err}
    if wrong:
        return res | {"status": "wrong_result", "error": wrong}
    # Untimed runs first: right after the check, a 2-thread kernel ran its first timed repeats up
    # to 2.5x slower than its steady state here (the pool's threads waking, caches, clocks), which
    # was enough to reorder candidates.
    # (A loop of our own: time_evaluator's search for a run count took 60-160 ms to warm up for 60.)
    warm_up(lambda: (f(*args, *outs), dev.sync()), settings.warmup_ms)
    if getattr(settings, "cold", False):
        # A model's task finds its activations where the layer before wrote them, and its weights
        # evicted by the layers since its last call: written again after each eviction, the
        # activations are back in the caches (a task whose weights are not known starts all cold).
        acts = w.prim.activations if w.prim is not None else []
        refill = (lambda: [args[i].copyfrom(xs[i]) for i in acts]) if acts else None
        times = cold_times(lambda: (f(*args, *outs), dev.sync()), max(1, settings.repeat), refill)
    else:
        ev = mod.time_evaluator("main", dev, number=1, repeat=settings.repeat,
                                min_repeat_ms=int(settings.min_repeat_ms))
        times = [float(t) for t in ev(*args, *outs).results]
    return res | {"status": "ok", "times": times, "median_s": float(np.median(times))}


def cold_times(call, n: int, refill=None) -> list[float]:
    """``n`` runs of ``call``, each timed alone right after :func:`evict` (and ``refill``, which
    brings back into the caches what should be there)."""
    out = []
    for _ in range(n):
        evict()
        if refill is not None:
            refill()
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    return out


def evict() -> None:
    """Write one value per cache line of a buffer twice the last-level cache: what a kernel left in
    the caches is gone, as after the layers before it in a model."""
    buf = _state.get("evict")
    if buf is None:
        buf = _state["evict"] = np.zeros(2 * _llc_bytes() // 4, np.float32)
    buf[::16] += 1.0


def _llc_bytes() -> int:
    """The largest cache of CPU 0 as sysfs describes it (e.g. ``32768K``), else 32 MiB."""
    import glob

    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
            best = max(best, int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1))
        except (OSError, ValueError, IndexError):
            continue
    return best or 32 << 20
