"""The measuring worker's side of an end-to-end run: a compiled model or an ONNX Runtime session,
run and timed inside a worker that holds the share (``spatialtune.measure.in_worker`` applied it:
every thread pinned to the share's cores, TVM's pool one thread per core).

Both are timed the same way, from Python, whole calls: untimed runs first (at least
``warmup_ms``), then ``repeat`` repeats of at least ``min_repeat_ms`` each (at least one call);
the median repeat's time per call counts. A model runs for milliseconds, so the microseconds of
Python around each call do not change the comparison.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np


def _time(fn: Callable[[], Any], settings: dict) -> list[float]:
    t_end = time.perf_counter() + settings.get("warmup_ms", 100) / 1e3
    fn()
    while time.perf_counter() < t_end:
        fn()
    times = []
    for _ in range(int(settings.get("repeat", 5))):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            el = time.perf_counter() - t0
            if el * 1e3 >= settings.get("min_repeat_ms", 50):
                break
        times.append(el / n)
    return times


def _as_list(out) -> list[np.ndarray]:
    import tvm

    if isinstance(out, (tuple, list)) or type(out).__name__ in ("Array", "List", "Tuple"):
        return [x for o in out for x in _as_list(o)]
    if isinstance(out, tvm.runtime.Tensor):
        return [out.numpy()]
    return [np.asarray(out)]


def run_compiled(library: str, inputs: list[np.ndarray], settings: dict) -> dict:
    """Load a Relax executable exported by ``export_library`` and run ``main`` on ``inputs`` in a
    Relax VirtualMachine on the CPU: its outputs (flattened), then its time."""
    import tvm
    from tvm import relax

    dev = tvm.cpu(0)
    vm = relax.VirtualMachine(tvm.runtime.load_module(library), dev)
    args = [tvm.runtime.tensor(x, dev) for x in inputs]
    main = vm["main"]
    outputs = _as_list(main(*args))
    times = _time(lambda: main(*args), settings)
    return {"outputs": outputs, "times": times, "median_s": float(np.median(times)),
            "cores": len(os.sched_getaffinity(0))}


def run_onnxruntime(model_path: str, feeds: dict[str, np.ndarray], settings: dict) -> dict:
    """ONNX Runtime (CPU execution provider) on this worker's share: as many intra-op threads as
    the share has cores, no inter-op parallelism. Its pool threads are started with the share's
    whole core set (this thread is bound to one core of it, and new threads inherit the mask of
    the thread that starts them); ``cores`` is what those threads are allowed to run on."""
    import onnxruntime as ort

    from ..measure.in_worker import share_cores

    share = share_cores() or tuple(sorted(os.sched_getaffinity(0)))
    so = ort.SessionOptions()
    so.intra_op_num_threads = len(share)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    mine = os.sched_getaffinity(0)
    before = set(os.listdir("/proc/self/task"))
    os.sched_setaffinity(0, share)
    try:
        sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
        outputs = [np.asarray(o) for o in sess.run(None, feeds)]
    finally:
        os.sched_setaffinity(0, mine)
    allowed: set[int] = set()
    for tid in set(os.listdir("/proc/self/task")) - before:
        try:
            allowed |= os.sched_getaffinity(int(tid))
        except OSError:  # a thread that ended
            pass
    times = _time(lambda: sess.run(None, feeds), settings)
    return {"outputs": outputs, "times": times, "median_s": float(np.median(times)),
            "cores": len(allowed) if allowed else 1, "version": ort.__version__}
