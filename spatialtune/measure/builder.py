"""Builders: scheduled IRModules in, loadable kernel artifacts out.

:class:`LocalBuilder` keeps one long-lived worker per core (MetaSchedule's stock builder starts
fresh workers that each pay TVM's import again, and with its 30 s timeout every build failed on
this class of machine). A build failure or a crashed build worker is recorded in the
:class:`BuildResult` and the other candidates go on.

For CUDA targets the builder also compiles the kernel source to a cubin (see :mod:`spatialtune.cuda.cubin`), so a
runner only loads machine code and never calls NVRTC.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import statistics
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError
from .worker import Worker, WorkerError

log = logging.getLogger(__name__)


@dataclass
class BuildInput:
    mod_json: str  # tvm.ir.save_json of the scheduled IRModule
    name: str  # file stem for the artifact (the kernel's mod_hash)
    group: str = ""  # builds compared for the relative deadline (a workload key); see LocalBuilder
    mod_hash: str = ""  # the module's structural hash, when known: one build per (kernel, target)
    # float32 erf/exp/tanh/sigmoid as vectorisable polynomials on a CPU target (workloads.fastmath);
    # the workload says whether (Workload.fast_math), so a task that fell back builds exact
    fast_math: bool = False

    @classmethod
    def of(cls, candidate, group: str = "", fast_math: bool = False) -> "BuildInput":
        """The input for a search candidate (anything with ``mod_json`` and ``mod_hash``): named
        and identified by its structural hash, its builds compared within ``group``."""
        return cls(candidate.mod_json, candidate.mod_hash, group, candidate.mod_hash, fast_math)


@dataclass
class BuildResult:
    artifact: str | None  # path of the exported library, None on failure
    error: str = ""
    build_s: float = 0.0
    cubin: str | None = None  # CUDA: path of the precompiled cubin

    @property
    def ok(self) -> bool:
        return self.artifact is not None


class Builder(ABC):
    """Contract: ``build`` returns one result per input, in order, and never raises for a bad
    candidate (only for a broken builder). Safe to call repeatedly; ``close`` frees workers."""

    @abstractmethod
    def build(self, inputs: Sequence[BuildInput], target: dict) -> list[BuildResult]: ...

    def close(self) -> None:
        pass

    def __enter__(self) -> "Builder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- in the worker


def _init_build_worker() -> int:
    import tvm  # noqa: F401  (the one slow import, paid once per worker)

    return os.getpid()


def build_one(mod_json: str, target: dict, out_dir: str, name: str, fast_math: bool = False) -> dict:
    """Compile one scheduled module and export it; runs inside a build worker. On an llvm target
    the module first gets :func:`spatialtune.workloads.prefetch.before_compile`: with
    ``fast_math``, float32 erf/exp/tanh/sigmoid become their vectorisable approximations (a GPU
    lowers them to fast device functions already), and the prefetches of tiled reductions."""
    import tvm

    t0 = time.perf_counter()
    from ..cuda.tensorcore import build_pass_config

    from ..workloads.prefetch import before_compile

    mod = before_compile(tvm.ir.load_json(mod_json), target, fast_math)
    tgt = tvm.target.Target(target)
    config = build_pass_config(mod_json, target)
    if config:  # a tensor-core kernel builds only without StorageRewrite (see cuda.tensorcore)
        with tvm.transform.PassContext(opt_level=tvm.transform.PassContext.current().opt_level, config=config):
            lib = tvm.compile(mod, target=tgt)
    else:
        lib = tvm.compile(mod, target=tgt)
    os.makedirs(out_dir, exist_ok=True)
    so = os.path.join(out_dir, f"{name}.so")
    cubin = None
    if target.get("kind") == "cuda":
        from ..cuda.cubin import compile_cubin_for

        cubin = compile_cubin_for(lib, os.path.join(out_dir, f"{name}.cubin"), target)
    lib.export_library(so)
    return {"artifact": so, "cubin": cubin, "build_s": time.perf_counter() - t0}


# ---------------------------------------------------------------- in the parent


def _stamp(r: BuildResult) -> tuple:
    """What identifies the files of a build on disk: a file written again under the same name
    (another module built as the same name, a deleted directory) is not the build remembered."""
    out = []
    for p in (r.artifact, r.cubin):
        if p:
            try:
                st = os.stat(p)
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)
    return tuple(out)


class LocalBuilder(Builder):
    """Parallel builds in persistent worker processes on this machine.

    **Relative deadline.** A few candidates of a design space take 10-100 times longer to build
    than the rest (huge unrolled bodies), and they are slow kernels: in our benchmark databases
    (docs/search.md) the builds over 10 s took 78-91 % of all build time on the batch matmul, and
    the fastest of them ran 7x or more behind the best kernel. Once ``min_samples`` builds of a
    group (a workload) on a target succeeded, a build of that group gets ``relative_timeout`` times
    their median, but never under ``min_timeout`` nor over ``timeout``; past it the worker is
    killed and the candidate is a failed build, like any other timeout. The floor matters: cut at
    2 s (10x a 0.2 s median) the batch-matmul search ended at 0.18 ms instead of 0.135 (a failed
    build tells the search nothing of the tiling it carried); at 10 s it stayed ahead of
    ``tune_tir`` and uniform sampling at every budget, as the uncut search was, in 554 s instead
    of 1967. With the floor one build is history enough (it was 8): the first batch of a job held
    builds of 18 and 36 s that the cut would have stopped at 10 (the tracker walk-through of
    docs/distributed.md took 73 s instead of about 22). ``relative_timeout=None`` turns this off."""

    def __init__(self, artifact_dir: str | Path, *, workers: int | None = None, timeout: float = 120.0,
                 relative_timeout: float | None = 10.0, min_timeout: float = 10.0, min_samples: int = 1):
        self.artifact_dir = str(artifact_dir)
        n = workers or len(os.sched_getaffinity(0))
        if n < 1:
            raise ConfigError(f"builder needs at least one worker, got {n}")
        if relative_timeout is not None and relative_timeout <= 1:
            raise ConfigError(f"a relative build deadline must exceed 1x the median, got {relative_timeout}")
        self.timeout = timeout
        self.relative_timeout, self.min_timeout, self.min_samples = relative_timeout, min_timeout, min_samples
        self._history: dict[tuple[str, str], deque[float]] = {}
        self._history_lock = threading.Lock()  # the drive threads add to it while others read
        # Artifacts built by this builder, by (module, target, directory): a job builds its best kernels
        # again to confirm them and measures the same config under several neighbours, and a
        # module compiled once for a target need not be compiled again while its files exist.
        self._built: dict[tuple[str, str, str, bool], tuple[BuildResult, tuple]] = {}
        self._workers = [Worker(init="spatialtune.measure.builder:_init_build_worker", name=f"build{i}") for i in range(n)]
        self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="build")
        # Concurrent callers (a job tuning several workloads at once) take turns: each build
        # already fills every worker, and a worker must be driven by one thread at a time.
        self._lock = threading.Lock()

    def build(self, inputs: Sequence[BuildInput], target: dict) -> list[BuildResult]:
        if not inputs:
            return []
        with self._lock:
            return self._build(inputs, target)

    def _build(self, inputs: Sequence[BuildInput], target: dict) -> list[BuildResult]:
        target = dict(target)
        tkey = json.dumps(target, sort_keys=True)
        # Each worker is driven by one thread and takes the next input when it is free, so one
        # slow build does not hold back the inputs queued behind it.
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(inputs)):
            todo.put(i)
        results: list[BuildResult | None] = [None] * len(inputs)

        def drive(wi: int) -> None:
            while True:
                try:
                    idx = todo.get_nowait()
                except queue.Empty:
                    return
                item = inputs[idx]
                # a kernel replayed from its trace serialises differently from the one the search
                # made, so the structural hash is the identity when the caller knows it
                # (and the directory: a caller that points the builder elsewhere wants the files there)
                key = (item.mod_hash or hashlib.sha1(item.mod_json.encode()).hexdigest(), tkey, self.artifact_dir,
                       item.fast_math)
                done = self._built.get(key)
                if done is not None and None not in done[1] and done[1] == _stamp(done[0]):
                    results[idx] = BuildResult(done[0].artifact, cubin=done[0].cubin, build_s=0.0)
                    continue
                results[idx] = r = self._build_in(self._workers[wi], item, target, tkey)
                if r.ok:
                    self._built[key] = (r, _stamp(r))

        list(self._pool.map(drive, range(len(self._workers))))
        return results  # type: ignore[return-value]

    def median_build(self, group: str, target: dict | str) -> float | None:
        """The median of the recent successful builds of ``group`` for ``target`` (None: too few)."""
        tkey = target if isinstance(target, str) else json.dumps(dict(target), sort_keys=True)
        with self._history_lock:
            done = list(self._history.get((group, tkey), ()))
        return statistics.median(done) if len(done) >= self.min_samples else None

    def deadline(self, group: str, target: dict | str) -> float:
        """Seconds a build of ``group`` for ``target`` may take now."""
        median = self.median_build(group, target)
        if self.relative_timeout is None or median is None:
            return self.timeout
        return min(self.timeout, max(self.min_timeout, self.relative_timeout * median))

    def _build_in(self, w: Worker, item: BuildInput, target: dict, tkey: str) -> BuildResult:
        t0 = time.perf_counter()
        limit = self.deadline(item.group, tkey)
        fast = item.fast_math and target.get("kind") == "llvm"
        # the exact and the fast build of one kernel are different libraries: different files
        name = item.name + ("-fast" if fast else "")
        try:
            r = w.call("spatialtune.measure.builder:build_one", item.mod_json, target, self.artifact_dir, name,
                       fast, timeout=limit)
        except WorkerError as e:
            log.debug("build of %s failed: %s", item.name, e)
            why = f"build {e.kind}: {e}"
            if e.kind == "timeout" and limit < self.timeout:
                why = (f"build timeout: over {self.relative_timeout:g}x the median build of this workload "
                       f"({self.median_build(item.group, tkey) or 0:.2f} s), cut at {limit:.1f} s")
            return BuildResult(artifact=None, error=why, build_s=time.perf_counter() - t0)
        with self._history_lock:
            self._history.setdefault((item.group, tkey), deque(maxlen=64)).append(r["build_s"])
        return BuildResult(artifact=r["artifact"], cubin=r["cubin"], build_s=r["build_s"])

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for w in self._workers:
            w.close()
