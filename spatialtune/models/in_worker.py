"""The measuring worker's side of an end-to-end run: compiled models and an ONNX Runtime session,
loaded once and timed interleaved, inside a worker that holds the share
(``spatialtune.measure.in_worker`` applied it: every thread pinned to the share's cores, TVM's
pool one thread per core).

The parent loads every variant of a share here (:func:`load_compiled`, :func:`load_onnxruntime`:
outputs first, then ``warmup_ms`` of untimed calls), then asks for one *slot* at a time
(:func:`time_slot`) in round-robin order, A B C D, A B C D, ...: a host that drifts over seconds
then drifts under every variant alike instead of under whichever ran last. A slot is one untimed
call (the previous slot's variant evicted this one's data from the caches) and then whole calls,
timed from Python, for at least ``min_repeat_ms`` (at least one); its time per call is that
variant's time in that round. A model runs for milliseconds, so the microseconds of Python around
each call do not change the comparison.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import numpy as np

_loaded: dict[str, Callable[[], Any]] = {}
_modules: dict[str, tuple[Any, list]] = {}  # a compiled variant's module and arguments, for its profile


def _as_list(out) -> list[np.ndarray]:
    import tvm

    if isinstance(out, (tuple, list)) or type(out).__name__ in ("Array", "List", "Tuple"):
        return [x for o in out for x in _as_list(o)]
    if isinstance(out, tvm.runtime.Tensor):
        return [out.numpy()]
    return [np.asarray(out)]


def _warm(fn: Callable[[], Any], settings: dict) -> None:
    from ..measure.in_worker import warm_up

    warm_up(fn, settings.get("warmup_ms", 100))


def load_compiled(name: str, library: str, inputs: list[np.ndarray], settings: dict) -> dict:
    """Load a Relax executable exported by ``export_library`` into a Relax VirtualMachine on the
    CPU as variant ``name``: its outputs (flattened) from a first run, then its warm-up."""
    import tvm
    from tvm import relax

    dev = tvm.cpu(0)
    lib = tvm.runtime.load_module(library)
    vm = relax.VirtualMachine(lib, dev)
    args = [tvm.runtime.tensor(x, dev) for x in inputs]
    main = vm["main"]
    outputs = _as_list(main(*args))
    _loaded[name] = lambda: main(*args)
    _modules[name] = (lib, args)
    _warm(_loaded[name], settings)
    return {"outputs": outputs, "cores": len(os.sched_getaffinity(0))}


def profile_compiled(name: str, settings: dict) -> dict:
    """Where the loaded compiled variant ``name`` spends its time inside the model: every call the
    Relax VM makes (the tuned kernels and its builtins: allocations, shape checks) timed through
    the VM's instrument hook, in a VM of its own over the same module and inputs, after the
    warm-up, over ``rounds`` x at least ``min_repeat_ms`` of runs. Per function: ``calls`` per
    run and ``time_s``, its mean time per run (all its calls); ``total_s``: the mean run with the
    hook, which adds a few microseconds per call. A kernel's time here is what it takes where the
    model runs it: its inputs as the layer before left them in the caches, which is what ONNX
    Runtime's profiler measures of its nodes."""
    import tvm
    from tvm import relax

    module, args = _modules[name]
    vm = relax.VirtualMachine(module, tvm.cpu(0))
    main = vm["main"]
    _warm(lambda: main(*args), settings)
    spent: dict[str, float] = {}
    calls: dict[str, int] = {}
    started: dict[str, float] = {}
    clock = time.perf_counter

    def hook(func, symbol, before, ret, *a):
        if before:
            started[symbol] = clock()
        else:
            spent[symbol] = spent.get(symbol, 0.0) + clock() - started[symbol]
            calls[symbol] = calls.get(symbol, 0) + 1
        return 0  # VMInstrumentReturnKind.NO_OP: run the call as usual

    vm.set_instrument(hook)
    runs, total = _profiled_runs(lambda: main(*args), settings)
    return {"functions": {s: {"calls": calls[s] // runs, "time_s": spent[s] / runs} for s in spent},
            "total_s": total / runs, "runs": runs}


def _profiled_runs(call: Callable[[], Any], settings: dict) -> tuple[int, float]:
    """Runs of ``call`` for ``rounds`` x at least ``min_repeat_ms`` (at least two), as a profile
    takes them: (how many, seconds in all)."""
    runs, t0 = 0, time.perf_counter()
    while runs < 2 or (time.perf_counter() - t0) * 1e3 < settings.get("min_repeat_ms", 50) * settings.get("rounds", 5):
        call()
        runs += 1
    return runs, time.perf_counter() - t0


def _session(model_path: str, profile_prefix: str | None = None, spinning: bool = False):
    """An ONNX Runtime session (CPU execution provider) on this worker's share: as many intra-op
    threads as the share has cores, no inter-op parallelism, each pool thread pinned to a core of the
    share that the calling thread (bound to one core of it, and the pool's first thread) is not on;
    returns (session, how many cores those threads may run on).

    ``spinning``: its pool threads spin waiting for work while a run goes on, ONNX Runtime's default
    and a few percent faster on two cores, and stop when the run returns
    (``session.force_spinning_stop``), so that a variant timed next in another process gets quiet
    cores. Without it they block between parallel sections (the profile, and a process that also
    runs TVM's pool, whose spinning threads would share the cores with them)."""
    import onnxruntime as ort

    from ..measure.in_worker import share_cores

    share = share_cores() or tuple(sorted(os.sched_getaffinity(0)))
    so = ort.SessionOptions()
    so.intra_op_num_threads = len(share)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if spinning:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    # Setting intra_op_num_threads turns off ONNX Runtime's own pinning: pin its pool threads (the
    # calling thread is the pool's first) one per core of the share, as TVM's pool is, on the cores
    # this thread is not bound to. ONNX Runtime numbers processors from 1.
    others = [c for c in share if c not in os.sched_getaffinity(0)]
    if len(share) > 1 and len(others) >= len(share) - 1:
        so.add_session_config_entry("session.intra_op_thread_affinities",
                                    ";".join(str(c + 1) for c in others[: len(share) - 1]))
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    mine = os.sched_getaffinity(0)
    before = set(os.listdir("/proc/self/task"))
    os.sched_setaffinity(0, share)
    try:
        sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
    finally:
        os.sched_setaffinity(0, mine)
    allowed: set[int] = set(mine) & set(share)  # the calling thread runs the pool's first share of work
    for tid in set(os.listdir("/proc/self/task")) - before:
        try:
            allowed |= os.sched_getaffinity(int(tid))
        except OSError:  # a thread that ended
            pass
    return sess, len(allowed) if allowed else 1


def load_onnxruntime(name: str, model_path: str, feeds: dict[str, np.ndarray], settings: dict) -> dict:
    """ONNX Runtime on this worker's share as variant ``name`` (see :func:`_session`): its outputs,
    the cores its threads may use, its version; then its warm-up."""
    import onnxruntime as ort

    sess, cores = _session(model_path, spinning=bool(settings.get("spinning")))
    outputs = [np.asarray(o) for o in sess.run(None, feeds)]
    _loaded[name] = lambda: sess.run(None, feeds)
    _warm(_loaded[name], settings)
    return {"outputs": outputs, "cores": cores, "version": ort.__version__}


def time_slot(name: str, settings: dict) -> dict:
    """One round's time per call of the loaded variant ``name`` (see the module doc): ``time_s``."""
    from ..measure.in_worker import slot_time

    return {"time_s": slot_time(_loaded[name], settings.get("min_repeat_ms", 50))}


def unload(name: str) -> None:
    _loaded.pop(name, None)
    _modules.pop(name, None)


def run_onnxruntime(model_path: str, feeds: dict[str, np.ndarray], settings: dict) -> dict:
    """ONNX Runtime alone on this share (a vendor anchor beside one kernel, not a model's
    variants): loaded and warmed up as :func:`load_onnxruntime`, then ``repeat`` slots; its outputs,
    the slots' times and their median."""
    name = "onnxruntime-anchor"
    try:
        out = load_onnxruntime(name, model_path, feeds, settings)
        times = [time_slot(name, settings)["time_s"] for _ in range(max(1, settings.get("repeat", 5)))]
    finally:
        unload(name)
    return out | {"times": times, "median_s": float(np.median(times))}


def _elements(shapes) -> int | None:
    """The elements of a node's first output from its profile event's ``output_type_shape``
    ([{"float": [128, 768]}]), or None where the event has none."""
    try:
        dims = next(iter(shapes[0].values()))
        return int(np.prod(dims)) if all(isinstance(d, int) and d > 0 for d in dims) else None
    except (TypeError, IndexError, KeyError, StopIteration, AttributeError):
        return None


def profile_onnxruntime(model_path: str, feeds: dict[str, np.ndarray], settings: dict, prefix: str) -> dict:
    """ONNX Runtime's own profile of the model on this share: a session like the timed one with
    ``enable_profiling``, warmed up (those runs are dropped), then ``rounds`` x at least
    ``min_repeat_ms`` of runs. Per node of ORT's optimized graph, in execution order: its name,
    operator, mean time per run and output elements (``size``, None if unknown); ``total_s``: the
    mean ``model_run`` (the whole ``run`` call). Means, not medians, so the nodes and the rest add
    up to the total."""
    sess, _ = _session(model_path, prefix)
    _warm(lambda: sess.run(None, feeds), settings)
    sess.run(None, feeds)
    runs, _ = _profiled_runs(lambda: sess.run(None, feeds), settings)
    path = sess.end_profiling()
    try:
        with open(path) as f:
            events = json.load(f)
    finally:
        os.unlink(path)
    run_events = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    kept = run_events[-runs:]  # the warm-up's runs come first
    t0 = kept[0]["ts"]
    nodes: dict[str, dict] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= t0:
            args = e.get("args", {})
            n = nodes.setdefault(e["name"][: -len("_kernel_time")],
                                 {"op": args.get("op_name", "?"), "us": 0.0, "first": e["ts"],
                                  "size": _elements(args.get("output_type_shape"))})
            n["us"] += e["dur"]
    ordered = sorted(nodes.items(), key=lambda kv: kv[1]["first"])
    return {"nodes": [{"name": k, "op": v["op"], "time_s": v["us"] / 1e6 / runs, "size": v["size"]}
                      for k, v in ordered],
            "total_s": sum(e["dur"] for e in kept) / 1e6 / runs, "runs": runs}
