"""Runners: measure built kernels under a share of the device, next to a neighbour.

Every measurement in :class:`LocalRunner` happens in a long-lived worker process that holds one
share (a partition cap cannot be changed inside a process for MPS, and a core set or green
context is cheapest to set once); what the worker does per candidate is in
:mod:`spatialtune.measure.in_worker`. A candidate that crashes the worker, or outlives
``timeout``, is recorded as ``runtime_error`` or ``timeout``; the worker is restarted and the
batch goes on (:func:`metered_call`, the one place that does this).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence


from ..device import DeviceInfo
from ..neighbours import Neighbour, create_neighbour
from ..neighbours.base import NeighbourReading
from ..partitions import Partition
from ..terms import Share
from .worker import Worker, WorkerError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSettings:
    repeat: int = 5  # timed repeats; the median counts
    min_repeat_ms: int = 20  # each repeat runs the kernel enough times to last this long
    timeout: float = 30.0  # per candidate, load + check + timing
    seed: int = 0
    warmup_ms: int = 60  # untimed runs first: thread pool, caches and clocks settle
    # Each timed run alone, right after other data filled the caches (measure.in_worker.evict): how
    # a model's task runs, the layers before it having evicted its weights. Off for a kernel
    # timed on its own, as its vendor baseline is.
    cold: bool = False


@dataclass
class RunInput:
    workload: dict  # spec.Workload.to_dict()
    artifact: str
    cubin: str | None = None
    mod_hash: str | None = None  # the kernel's identity (lets a replay runner find its record)
    # What a deferred runner packs so that the result can be recorded when it comes back (trace,
    # features, source, search_s, build_s); a runner that measures now needs none of it.
    candidate: dict | None = None


@dataclass
class MeasureResult:
    status: str  # ok | wrong_result | runtime_error | timeout | pending (a deferred runner: measured later)
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


ResultFn = Callable[[int, "MeasureResult"], None]


class Runner(ABC):
    """Contract: ``run`` returns one result per input, in order, and hands each to ``on_result``
    the moment it exists (so a caller can record it before the next one runs); a bad kernel is a
    result, not an exception. The share and interference hold for the whole batch. ``real``:
    whether results come from hardware (baselines and comparison measurements need it).

    ``deferred``: the runner measures later, elsewhere (a GPU bundle): every result of ``run`` is
    ``pending``, which the caller records neither as a time nor as a failure; the measurements
    reach the database by another way (``bundle import``) and the caller picks them up from there
    when it runs again."""

    real = True
    deferred = False
    baselines = False  # can time TVM's default schedule and numpy next to the kernels
    parallel = 1  # measurements it can make at once (a pool of servers: how many; ``run`` is then thread-safe)

    @abstractmethod
    def run(self, share: Share, interference: str, inputs: Sequence[RunInput],
            on_result: ResultFn | None = None) -> list[MeasureResult]:
        """Measure ``inputs``; ``on_result(i, result)`` is called as each one completes."""

    def measures_on(self) -> tuple[DeviceInfo, Partition] | None:
        """The device and partition the measurements happen on when they are not this machine's
        (servers elsewhere); None for this machine."""
        return None

    def measure_baseline(self, share: Share, interference: str, workload: dict, kind: str,
                         artifact: str | None = None, cubin: str | None = None) -> MeasureResult:
        """``tvm-default`` (TVM's untuned kernel, given as artifact) or ``numpy``; only where
        ``baselines`` is true."""
        raise NotImplementedError(f"{type(self).__name__} measures no baselines")

    def close(self) -> None:
        pass

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- in the parent


class LocalRunner(Runner):
    """Measures on this machine's device through per-share worker processes."""

    baselines = True

    def __init__(self, partition: Partition, *, device_kind: str = "cpu", settings: RunSettings | None = None,
                 extra_env: dict[str, str] | None = None):
        self.partition = partition
        self.device_kind = device_kind
        self.settings = settings or RunSettings()
        self.extra_env = dict(extra_env or {})
        self._workers: dict[tuple, Worker] = {}
        self._calls = 0

    def worker_for(self, share: Share, *, start: bool = True) -> Worker:
        """The worker holding ``share`` (started unless ``start`` is False)."""
        key = (share.partition_kind, share.units, share.cores)
        w = self._workers.get(key)
        if w is None:
            env = dict(os.environ) | self.extra_env | self.partition.worker_env(share)
            w = Worker(init="spatialtune.measure.in_worker:init_measure_worker",
                       init_args=(share.partition_kind, share, self.device_kind),
                       env=env, name=f"measure-{share.partition_kind}-{share.units}{share.unit}")
            self._workers[key] = w
        if start and not w.alive:
            w.start()
        return w

    def run(self, share: Share, interference: str | Neighbour, inputs: Sequence[RunInput],
            on_result: ResultFn | None = None) -> list[MeasureResult]:
        if not inputs:
            return []
        out = []
        with self.hold(share, interference) as held:
            for i, item in enumerate(inputs):
                out.append(held.measure(item))
                if on_result is not None:
                    on_result(i, out[-1])
        return out

    @contextlib.contextmanager
    def hold(self, share: Share, interference: str | Neighbour) -> Iterator["Held"]:
        """Hold ``share`` with its neighbour running, for measurements one at a time: what ``run``
        does for a batch, open for as long as the caller needs (a measuring server keeps it
        across requests). The worker is not started here: a failed start costs one measurement."""
        w = self.worker_for(share, start=False)
        neighbour = create_neighbour(interference, partition=self.partition, device_kind=self.device_kind)
        with neighbour.running(share) as meter:
            yield Held(self, w, meter, cold=neighbour.cold)

    def next_seed(self) -> int:
        """A fresh input seed per call, so no two measurements share their random inputs."""
        self._calls += 1
        return (self.settings.seed * 1_000_003 + self._calls * 7919 + os.getpid()) % (2**31)

    def measure_baseline(self, share: Share, interference: str, workload: dict, kind: str,
                         artifact: str | None = None, cubin: str | None = None) -> MeasureResult:
        """``tvm-default`` (TVM's untuned kernel, given as artifact) or ``numpy``."""
        with self.hold(share, interference) as held:
            if kind == "numpy":
                return held.numpy(workload)
            return held.measure(RunInput(workload, artifact, cubin))

    def close(self) -> None:
        for w in self._workers.values():
            w.close()
        self._workers.clear()


class Held:
    """A share held with its neighbour running (:meth:`LocalRunner.hold`): measures one input per
    call, through :func:`metered_call` like every measurement."""

    def __init__(self, runner: LocalRunner, worker: Worker, meter, cold: bool = False):
        self.runner, self.worker, self.meter, self.cold = runner, worker, meter, cold

    @property
    def settings(self) -> RunSettings:
        """The runner's settings as they are now (a measuring server sets them per request), cold
        under a neighbour that empties the caches."""
        s = self.runner.settings
        return dataclasses.replace(s, cold=True) if self.cold and not s.cold else s

    def measure(self, item: RunInput) -> MeasureResult:
        s = self.settings
        return MeasureResult(**metered_call(self.worker, self.meter, s.timeout,
                                            "spatialtune.measure.in_worker:measure_one", item.workload, item.artifact,
                                            item.cubin, s, self.runner.next_seed()))

    def numpy(self, workload: dict) -> MeasureResult:
        s = self.settings
        return MeasureResult(**metered_call(self.worker, self.meter, s.timeout * 4,
                                            "spatialtune.measure.vendor:measure_numpy", workload, s,
                                            self.runner.next_seed()))


class ReplayRunner(Runner):
    """Answers from measurements already in a database, without hardware: the deterministic
    runner for CPU-only CI and for replaying a GPU host's measurements to study the search
    offline. A kernel that was never measured under the key comes back as ``runtime_error``.
    The share's ratio and the interference passed to ``run`` select the recorded key.
    """

    real = False

    def __init__(self, db, *, device_id: str, partition: str):
        self.partition = partition
        self._by_key: dict[tuple, dict[str, object]] = {}
        for m in db.measurements(device_id=device_id, partition=partition):
            self._by_key.setdefault((m.workload_key, m.ratio, m.interference), {})[m.mod_hash] = m

    def run(self, share: Share, interference: str, inputs: Sequence[RunInput],
            on_result: ResultFn | None = None) -> list[MeasureResult]:
        from ..workloads.spec import Workload

        out = []
        for i, item in enumerate(inputs):
            key = (Workload.from_dict(item.workload).key, share.key_ratio, str(interference))
            m = self._by_key.get(key, {}).get(item.mod_hash or "")
            if m is None:
                out.append(MeasureResult(status="runtime_error", error=f"replay: no recorded measurement of "
                                                                          f"{item.mod_hash} under {key}"))
            else:
                out.append(MeasureResult(status=m.status, error=m.error, times=list(m.times), median_s=m.median_s,
                                         rel_err=m.rel_err, granted_units=m.granted_units,
                                         neighbour_throughput=m.neighbour_throughput,
                                         neighbour_unit=m.neighbour_unit))
            if on_result is not None:
                on_result(i, out[-1])
        return out


def metered_call(w: Worker, meter, timeout: float, fn: str, *args) -> dict[str, Any]:
    """One call of ``fn`` in measuring worker ``w`` next to the neighbour read by ``meter``.

    Returns the call's result fields, plus ``run_s`` and the neighbour's throughput during the
    call. A failed call is a result (``timeout`` or ``runtime_error`` with the message), never an
    exception. A worker that died (a crash, a kill after a timeout) is started again by the next
    call; one that raised is restarted at once, since nobody vouches for its state; a start that
    fails is that call's result, not the job's end.
    """
    t0 = time.perf_counter()
    before = meter.read()
    try:
        if not w.alive:
            w.start()  # a worker that did not restart after the last candidate gets another chance
        res = dict(w.call(fn, *args, timeout=timeout))
    except WorkerError as e:
        res = {"status": "timeout" if e.kind == "timeout" else "runtime_error", "error": str(e)}
        # A crash or a kill leaves no process; an exception raised inside the kernel's call leaves
        # one whose state (TVM's, the device's) nobody vouches for. Neither measures again.
        if w.alive and e.kind == "error":
            log.info("restarting %s after an exception in the call", w.name)
            try:
                w.restart()
            except WorkerError as e2:
                log.warning("%s did not restart (%s); the next call tries again", w.name, e2)
                res["error"] += f"; worker restart failed: {e2}"
    res["run_s"] = time.perf_counter() - t0
    reading = NeighbourReading.between(before, meter.read())
    if reading is not None:
        res["neighbour_throughput"], res["neighbour_unit"] = reading.throughput, reading.unit
    return res
