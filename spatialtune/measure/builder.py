"""Builders: scheduled IRModules in, loadable kernel artifacts out.

:class:`LocalBuilder` keeps one long-lived worker per core (MetaSchedule's stock builder starts
fresh workers that each pay TVM's import again, and with its 30 s timeout every build failed on
this class of machine). A build failure or a crashed build worker is recorded in the
:class:`BuildResult` and the other candidates go on.

For CUDA targets the builder also compiles the kernel source to a cubin (see :mod:`spatialtune.cuda.cubin`), so a
runner only loads machine code and never calls NVRTC.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
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


def build_one(mod_json: str, target: dict, out_dir: str, name: str) -> dict:
    """Compile one scheduled module and export it; runs inside a build worker."""
    import tvm

    t0 = time.perf_counter()
    mod = tvm.ir.load_json(mod_json)
    tgt = tvm.target.Target(target)
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


class LocalBuilder(Builder):
    """Parallel builds in persistent worker processes on this machine."""

    def __init__(self, artifact_dir: str | Path, *, workers: int | None = None, timeout: float = 120.0):
        self.artifact_dir = str(artifact_dir)
        n = workers or len(os.sched_getaffinity(0))
        if n < 1:
            raise ConfigError(f"builder needs at least one worker, got {n}")
        self.timeout = timeout
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
        n = len(self._workers)
        # Worker i takes inputs i, i+n, ...: each worker is driven by exactly one thread.
        slices = [list(range(i, len(inputs), n)) for i in range(n)]
        results: list[BuildResult | None] = [None] * len(inputs)

        def drive(wi: int) -> None:
            w = self._workers[wi]
            for idx in slices[wi]:
                results[idx] = self._build_in(w, inputs[idx], target)

        list(self._pool.map(drive, range(n)))
        return results  # type: ignore[return-value]

    def _build_in(self, w: Worker, item: BuildInput, target: dict) -> BuildResult:
        t0 = time.perf_counter()
        try:
            r = w.call("spatialtune.measure.builder:build_one", item.mod_json, target, self.artifact_dir, item.name,
                       timeout=self.timeout)
            return BuildResult(artifact=r["artifact"], cubin=r["cubin"], build_s=r["build_s"])
        except WorkerError as e:
            log.debug("build of %s failed: %s", item.name, e)
            return BuildResult(artifact=None, error=f"build {e.kind}: {e}", build_s=time.perf_counter() - t0)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for w in self._workers:
            w.close()
