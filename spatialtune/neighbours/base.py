"""The neighbour contract and its plumbing: progress files, meters, the neighbour process.

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
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator

from ..errors import DeviceError

PROGRESS_FMT = "<dd"  # work done (in `unit` · s), monotonic time of the last update
PROGRESS_SIZE = struct.calcsize(PROGRESS_FMT)


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
            self._mm = mmap.mmap(self._f.fileno(), PROGRESS_SIZE)

    def read(self) -> NeighbourReading | None:
        if self._mm is None:
            return None
        work, t = struct.unpack(PROGRESS_FMT, self._mm[:PROGRESS_SIZE])
        return NeighbourReading(work, t, self.unit) if t > 0 else None

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._f.close()
            self._mm = None


class Neighbour(ABC):
    """Contract: ``running(share)`` starts the neighbour (returning only once it makes progress),
    yields a :class:`Meter`, and stops it on exit, also on errors. Reusable."""

    name: str = "none"
    # Whether each timed run starts with the caches emptied (the measuring settings' ``cold``).
    cold: bool = False

    @abstractmethod
    def running(self, share) -> contextlib.AbstractContextManager[Meter]: ...


class NoNeighbour(Neighbour):
    name = "none"

    @contextlib.contextmanager
    def running(self, share) -> Iterator[Meter]:
        yield Meter()


class ColdCaches(NoNeighbour):
    """``cold``: nothing runs beside the kernel, but each timed run starts right after a buffer
    twice the last-level cache was written (``measure.in_worker.evict``), so it finds none of its
    data in the caches but a model task's activations, written again after the eviction
    (``PrimTask.weights`` says which inputs are not). That is how a model's task runs when what ran
    since its last call (the model's other layers, a neighbour) evicted its weights, while a kernel
    timed back to back on its own buffers keeps them cached; where the model's whole footprint
    fits the last-level cache and nothing else runs, it is pessimistic (docs/models.md). An
    operator's kernel starts all cold, as after another tenant time-shared its cores."""

    name = "cold"
    cold = True


class ProcessNeighbour(Neighbour):
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
        os.write(fd, b"\0" * PROGRESS_SIZE)
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


def publish(mm, work: float) -> None:
    """In a neighbour process: record ``work`` done so far (and the time) in its progress file."""
    mm[:PROGRESS_SIZE] = struct.pack(PROGRESS_FMT, work, time.monotonic())
