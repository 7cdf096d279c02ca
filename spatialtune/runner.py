"""Runners: measure built kernels under a share of the device, next to a neighbour.

Every measurement in :class:`LocalRunner` happens in a long-lived worker process that holds one
share (a partition cap cannot be changed inside a process for MPS, and a core set or green
context is cheapest to set once). For each candidate the worker

1. loads the artifact (a cubin on CUDA: no compile at load),
2. draws fresh random inputs and fills the output with NaN,
3. runs the kernel once and compares with a float64 numpy reference: a kernel whose relative
   error exceeds the operator's tolerance is ``wrong_result`` and is never timed,
4. times it (warm-up, then the median of ``repeat`` timed runs).

A candidate that crashes the worker, or outlives ``timeout``, is recorded as ``runtime_error`` or
``timeout``; the worker is restarted and the batch goes on.
"""

from __future__ import annotations

import logging
import os
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from .interference import Interference, NeighbourReading, create_interference
from .partition import Partition, Share
from .worker import Worker, WorkerError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSettings:
    repeat: int = 5  # timed repeats; the median counts
    min_repeat_ms: int = 20  # each repeat runs the kernel enough times to last this long
    timeout: float = 30.0  # per candidate, load + check + timing
    seed: int = 0


@dataclass
class RunInput:
    workload: dict  # spec.Workload.to_dict()
    artifact: str
    cubin: str | None = None
    mod_hash: str | None = None  # the kernel's identity (lets a replay runner find its record)


@dataclass
class MeasureResult:
    status: str  # ok | wrong_result | runtime_error | timeout
    error: str = ""
    times: list[float] = field(default_factory=list)
    median_s: float | None = None
    rel_err: float | None = None
    granted_units: int | None = None
    load_s: float | None = None
    run_s: float = 0.0
    neighbour_throughput: float | None = None
    neighbour_unit: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Runner(ABC):
    """Contract: ``run`` returns one result per input, in order; a bad kernel is a result, not an
    exception. The share and interference hold for the whole batch."""

    @abstractmethod
    def run(self, share: Share, interference: str, inputs: Sequence[RunInput]) -> list[MeasureResult]: ...

    def close(self) -> None:
        pass

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- in the worker

_state: dict[str, Any] = {}


def init_measure_worker(partition_kind: str, share: Share, device_kind: str) -> int | None:
    """Apply the share inside this worker; return the units it sees (cores or SMs)."""
    from .partition import create_partition

    part = create_partition(partition_kind) if partition_kind == "cpu" else None
    seen = part.enter(share) if part is not None else None
    if device_kind == "cuda":
        from .gpu_runtime import enter_cuda_worker

        seen = enter_cuda_worker(partition_kind, share)
    _state.update(device_kind=device_kind, seen=seen, share=share)
    return seen


def _device():
    import tvm

    return tvm.cuda(0) if _state.get("device_kind") == "cuda" else tvm.cpu(0)


def _load(artifact: str, cubin: str | None):
    if _state.get("device_kind") == "cuda":
        from .gpu_runtime import load_module

        return load_module(artifact, cubin)
    import tvm

    return tvm.runtime.load_module(artifact)


def measure_one(workload: dict, artifact: str, cubin: str | None, settings: RunSettings, seed: int) -> dict:
    """Check then time one kernel in this worker. Returns MeasureResult fields."""
    import tvm

    from .ops import TOLERANCE, relative_error
    from .spec import Workload

    w = Workload.from_dict(workload)
    op = w.operator
    dev = _device()
    t0 = time.perf_counter()
    mod = _load(artifact, cubin)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    xs = op.random_inputs(w.params, w.dtype, rng)
    ref = op.reference(w.params, xs)
    args = [tvm.runtime.tensor(x, dev) for x in xs]
    out = tvm.runtime.tensor(np.full(op.output_shape(w.params), np.nan, dtype=op.out_dtype(w.dtype)), dev)
    f = mod["main"]
    f(*args, out)
    dev.sync()
    err = relative_error(out.numpy(), ref)
    res = {"granted_units": _state.get("seen"), "load_s": load_s, "rel_err": err}
    if not err <= TOLERANCE[w.dtype]:
        return res | {"status": "wrong_result",
                      "error": f"relative error {err:.3g} exceeds {TOLERANCE[w.dtype]:g} against the float64 reference"}
    ev = mod.time_evaluator("main", dev, number=1, repeat=settings.repeat, min_repeat_ms=int(settings.min_repeat_ms))
    times = [float(t) for t in ev(*args, out).results]
    return res | {"status": "ok", "times": times, "median_s": float(np.median(times))}


def measure_numpy(workload: dict, settings: RunSettings, seed: int) -> dict:
    """The vendor baseline on the CPU: numpy (BLAS for the matmuls) with this worker's cores."""
    from .spec import Workload

    w = Workload.from_dict(workload)
    op = w.operator
    rng = np.random.default_rng(seed)
    xs = op.random_inputs(w.params, w.dtype, rng)
    fn = _numpy_impl(w)
    fn(xs)
    times = []
    for _ in range(settings.repeat):
        n, t0 = 0, time.perf_counter()
        while True:
            fn(xs)
            n += 1
            el = time.perf_counter() - t0
            if el * 1e3 >= settings.min_repeat_ms:
                break
        times.append(el / n)
    return {"status": "ok", "times": times, "median_s": float(np.median(times)), "granted_units": _state.get("seen")}


def _numpy_impl(w):
    p = w.params
    if w.op == "matmul":
        return lambda xs: xs[0] @ xs[1]
    if w.op == "dense":
        return lambda xs: xs[0] @ xs[1].T
    if w.op == "batch_matmul":
        return (lambda xs: xs[0] @ xs[1].transpose(0, 2, 1)) if p["transpose_b"] else (lambda xs: xs[0] @ xs[1])
    # Convolutions in the input precision, the way a numpy user would write them (im2col + GEMM).
    from .ops import _conv_ref

    dw = w.op == "depthwise_conv2d"
    return lambda xs: _conv_ref(p, [xs[0].astype(np.float32), xs[1].astype(np.float32)], dw)


# ---------------------------------------------------------------- in the parent


class LocalRunner(Runner):
    """Measures on this machine's device through per-share worker processes."""

    def __init__(self, partition: Partition, *, device_kind: str = "cpu", settings: RunSettings | None = None,
                 extra_env: dict[str, str] | None = None):
        self.partition = partition
        self.device_kind = device_kind
        self.settings = settings or RunSettings()
        self.extra_env = dict(extra_env or {})
        self._workers: dict[tuple, Worker] = {}
        self._calls = 0

    def worker_for(self, share: Share) -> Worker:
        key = (share.partition, share.units, share.cores)
        w = self._workers.get(key)
        if w is None:
            env = dict(os.environ) | self.extra_env | self.partition.worker_env(share)
            w = Worker(init="spatialtune.runner:init_measure_worker", init_args=(share.partition, share,
                                                                                 self.device_kind),
                       env=env, name=f"measure-{share.partition}-{share.units}{share.unit}")
            self._workers[key] = w
        if not w.alive:
            w.start()
        return w

    def run(self, share: Share, interference: str | Interference, inputs: Sequence[RunInput]) -> list[MeasureResult]:
        if not inputs:
            return []
        w = self.worker_for(share)
        neighbour = create_interference(interference, partition=self.partition, device_kind=self.device_kind)
        out = []
        with neighbour.running(share) as meter:
            for item in inputs:
                out.append(self._measure(w, item, meter))
        return out

    def _seed(self) -> int:
        self._calls += 1
        return (self.settings.seed * 1_000_003 + self._calls * 7919 + os.getpid()) % (2**31)

    def _measure(self, w: Worker, item: RunInput, meter) -> MeasureResult:
        return self._call(w, meter, self.settings.timeout, "spatialtune.runner:measure_one", item.workload,
                          item.artifact, item.cubin, self.settings, self._seed())

    def _call(self, w: Worker, meter, timeout: float, fn: str, *args) -> MeasureResult:
        """One measurement in ``w``; a failed call is a result, and a dead worker is restarted."""
        t0 = time.perf_counter()
        before = meter.read()
        try:
            res = MeasureResult(**w.call(fn, *args, timeout=timeout))
        except WorkerError as e:
            res = MeasureResult(status="timeout" if e.kind == "timeout" else "runtime_error", error=str(e))
            if not w.alive:  # a crash or a kill: a poisoned process never measures again
                log.info("restarting %s after %s", w.name, e.kind)
                w.restart()
        res.run_s = time.perf_counter() - t0
        _attach(res, NeighbourReading.between(before, meter.read()))
        return res

    def measure_baseline(self, share: Share, interference: str, workload: dict, kind: str,
                         artifact: str | None = None) -> MeasureResult:
        """``tvm-default`` (the unscheduled kernel, given as artifact) or ``numpy``."""
        w = self.worker_for(share)
        neighbour = create_interference(interference, partition=self.partition, device_kind=self.device_kind)
        with neighbour.running(share) as meter:
            if kind == "numpy":
                return self._call(w, meter, self.settings.timeout * 4, "spatialtune.runner:measure_numpy", workload,
                                  self.settings, self._seed())
            return self._measure(w, RunInput(workload, artifact), meter)

    def close(self) -> None:
        for w in self._workers.values():
            w.close()
        self._workers.clear()


class ReplayRunner(Runner):
    """Answers from measurements already in a database, without hardware: the deterministic
    runner for CPU-only CI and for replaying a GPU host's measurements to study the search
    offline. A kernel that was never measured under the key comes back as ``runtime_error``.
    The share's ratio and the interference passed to ``run`` select the recorded key.
    """

    def __init__(self, db, *, device_id: str, partition: str):
        self.partition = partition
        self._by_key: dict[tuple, dict[str, object]] = {}
        for m in db.measurements(device_id=device_id, partition=partition):
            self._by_key.setdefault((m.workload_key, m.ratio, m.interference), {})[m.mod_hash] = m

    def run(self, share: Share, interference: str, inputs: Sequence[RunInput]) -> list[MeasureResult]:
        from .database import norm_ratio
        from .spec import Workload

        out = []
        for item in inputs:
            key = (Workload.from_dict(item.workload).key, norm_ratio(share.ratio), str(interference))
            m = self._by_key.get(key, {}).get(item.mod_hash or "")
            if m is None:
                out.append(MeasureResult(status="runtime_error", error=f"replay: no recorded measurement of "
                                                                          f"{item.mod_hash} under {key}"))
                continue
            out.append(MeasureResult(status=m.status, error=m.error, times=list(m.times), median_s=m.median_s,
                                     rel_err=m.rel_err, granted_units=m.granted_units,
                                     neighbour_throughput=m.neighbour_throughput, neighbour_unit=m.neighbour_unit))
        return out


def _attach(res: MeasureResult, reading: NeighbourReading | None) -> None:
    if reading is not None:
        res.neighbour_throughput = reading.throughput
        res.neighbour_unit = reading.unit
