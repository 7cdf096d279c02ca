"""Interference: a named, reproducible neighbour that runs while we measure.

Conditions (part of every database key):

- ``none``: nothing else runs;
- ``compute``: an arithmetic-bound loop (a cache-resident GEMM on the CPU, FMA/GEMM on a GPU);
- ``memory``: a streaming copy far larger than the last-level cache;
- ``tenant:WORKLOAD``: the tuned kernel of another workload, in a loop (GPU, see gpu_interference).

A neighbour is a separate process on the rest of the device (``Partition.neighbour_share``; when
the share is the whole device it shares it, as an MPS client at 100% would). It publishes its
progress (work done, time) in a small memory-mapped file, so the runner reads how hard it pushed
during each single measurement and records that throughput next to the time.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator

from .errors import ConfigError, DeviceError

_FMT = "<dd"  # work done (in `unit` · s), monotonic time of the last update
_SIZE = struct.calcsize(_FMT)
CPU_KINDS = ("compute", "memory")


@dataclass(frozen=True)
class NeighbourReading:
    work: float
    t: float
    unit: str

    @staticmethod
    def between(a: "NeighbourReading | None", b: "NeighbourReading | None") -> "Throughput | None":
        if a is None or b is None or b.t <= a.t:
            return None
        return Throughput((b.work - a.work) / (b.t - a.t), b.unit)


@dataclass(frozen=True)
class Throughput:
    throughput: float
    unit: str


class Meter:
    """Reads a neighbour's progress file; ``read`` is None without a neighbour."""

    def __init__(self, path: str | None = None, unit: str = ""):
        self.unit = unit
        self._mm = None
        if path:
            self._f = open(path, "r+b")
            self._mm = mmap.mmap(self._f.fileno(), _SIZE)

    def read(self) -> NeighbourReading | None:
        if self._mm is None:
            return None
        work, t = struct.unpack(_FMT, self._mm[:_SIZE])
        return NeighbourReading(work, t, self.unit) if t > 0 else None

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._f.close()
            self._mm = None


class Interference(ABC):
    """Contract: ``running(share)`` starts the neighbour (returning only once it makes progress),
    yields a :class:`Meter`, and stops it on exit, also on errors. Reusable."""

    name: str = "none"

    @abstractmethod
    def running(self, share) -> contextlib.AbstractContextManager[Meter]: ...


class NoInterference(Interference):
    name = "none"

    @contextlib.contextmanager
    def running(self, share) -> Iterator[Meter]:
        yield Meter()


class ProcessNeighbour(Interference):
    """A neighbour process: ``argv`` gets the progress file appended; it must update it."""

    start_timeout = 60.0

    def __init__(self, name: str, unit: str, env: dict[str, str] | None = None):
        self.name, self.unit, self.env = name, unit, env

    @abstractmethod
    def command(self, share) -> tuple[list[str], dict[str, str], tuple[int, ...] | None]:
        """(argv, extra env, cores to pin to or None)."""

    @contextlib.contextmanager
    def running(self, share) -> Iterator[Meter]:
        fd, path = tempfile.mkstemp(prefix="spatialtune-neighbour-")
        os.write(fd, b"\0" * _SIZE)
        os.close(fd)
        argv, extra, cores = self.command(share)
        env = dict(os.environ if self.env is None else self.env) | extra
        pre = (lambda: os.sched_setaffinity(0, cores)) if cores else None
        proc = subprocess.Popen(argv + [path], env=env, preexec_fn=pre, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        meter = Meter(path, self.unit)
        try:
            deadline = time.monotonic() + self.start_timeout
            while meter.read() is None:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace").strip().splitlines()
                    raise DeviceError(f"interference {self.name!r} failed to start: {err[-1] if err else proc.returncode}")
                if time.monotonic() > deadline:
                    raise DeviceError(f"interference {self.name!r} made no progress in {self.start_timeout:.0f} s")
                time.sleep(0.02)
            yield meter
        finally:
            meter.close()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()
            proc.stderr.close()
            os.unlink(path)


class CpuNeighbour(ProcessNeighbour):
    """``compute``: a 256x256 float32 GEMM that lives in cache; ``memory``: copies of a 256 MiB
    buffer. Both through numpy with as many threads as the neighbour has cores."""

    def __init__(self, kind: str, partition):
        if kind not in CPU_KINDS:
            raise ConfigError(f"unknown CPU interference {kind!r} (known: none, {', '.join(CPU_KINDS)})")
        super().__init__(kind, "GFLOP/s" if kind == "compute" else "GB/s")
        self.kind, self.partition = kind, partition

    def command(self, share):
        rest = self.partition.neighbour_share(share)
        cores = rest.cores if rest is not None else share.cores
        n = str(len(cores))
        env = {"OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n}
        return [sys.executable, "-m", "spatialtune.interference", self.kind], env, tuple(cores)


def create_interference(spec: str | Interference, *, partition=None, device_kind: str = "cpu") -> Interference:
    if isinstance(spec, Interference):
        return spec
    check_interference(spec)
    if spec == "none":
        return NoInterference()
    if device_kind == "cuda":
        from . import gpu_interference

        return gpu_interference.create(spec, partition=partition)
    if spec.startswith("tenant:"):
        raise ConfigError("interference 'tenant:WORKLOAD' runs on GPUs only (use none, compute or memory on the CPU)")
    return CpuNeighbour(spec, partition)


def check_interference(spec: str) -> str:
    if spec in ("none",) + CPU_KINDS:
        return spec
    if spec.startswith("tenant:") and len(spec) > len("tenant:"):
        return spec
    raise ConfigError(f"unknown interference {spec!r} (known: none, compute, memory, tenant:WORKLOAD)")


# ---------------------------------------------------------------- the neighbour process


def _publish(mm, work: float) -> None:
    mm[:_SIZE] = struct.pack(_FMT, work, time.monotonic())


def _cpu_main(kind: str, path: str) -> None:
    import numpy as np

    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), _SIZE)
        if kind == "compute":
            a = np.random.default_rng(0).standard_normal((256, 256), dtype=np.float32)
            b = a.copy()
            step_work = 2 * 256**3 / 1e9
            step = lambda: np.matmul(a, b, out=b)  # noqa: E731 (b stays bounded: renormalised below)
        else:
            src = np.ones(64 * 2**20, dtype=np.float32)
            dst = np.empty_like(src)
            step_work = 2 * src.nbytes / 1e9  # bytes read + written
            step = lambda: np.copyto(dst, src)  # noqa: E731
        work = 0.0
        while True:
            for _ in range(4):
                step()
                work += step_work
            if kind == "compute":
                b /= np.abs(b).max() + 1.0
            _publish(mm, work)


if __name__ == "__main__":
    _cpu_main(sys.argv[1], sys.argv[2])
