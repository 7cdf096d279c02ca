"""Partitions: "run this measurement with share r of the device".

A :class:`Partition` maps a requested ratio (percent of the device) to a :class:`Share` that
says what was actually granted (whole cores, whole SMs), and it applies that share to a
measuring worker in one of two ways:

- **process-level** caps are fixed when the worker starts (``worker_env``): MPS reads
  ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` once per process, so one worker serves one share;
- **in-process** caps are applied inside the worker (``enter``): a CPU core set through
  ``sched_setaffinity``, a CUDA green context with an exact SM count.

Either way the runner keeps one long-lived worker per (share, interference) and records the
granted share with every measurement. Ratio-to-units rounding lives only in ``grant``.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from .errors import ConfigError, DeviceError


@dataclass(frozen=True)
class Share:
    partition: str  # partition kind: cpu | mps | green
    ratio: float  # the share asked for, percent of the device
    units: int  # cores or SMs granted
    total: int  # cores or SMs of the whole device
    unit: str  # "core" | "SM"
    cores: tuple[int, ...] = field(default=())  # CPU: the core ids granted

    @property
    def fraction(self) -> float:
        return self.units / self.total

    def describe(self) -> str:
        return f"{self.ratio:g}% -> {self.units}/{self.total} {self.unit}s"


class Partition(ABC):
    """Contract for a way of capping the resources a measurement may use.

    - ``grant(ratio)`` is pure and deterministic: the same ratio always maps to the same units.
    - ``worker_env(share)`` returns the environment additions a measuring worker needs *at
      start*; ``enter(share)`` runs inside that worker before its first measurement and may
      return the units it actually sees (recorded instead of the planned ones).
    - ``setup()``/``teardown()`` bracket a tuning job (start/stop a daemon); ``teardown`` must be
      safe to call twice and after a failed ``setup``.
    - ``neighbour_share(share)`` is the rest of the device, where an interference co-runner goes.
    """

    kind: str = ""
    scope: str = "in-process"  # or "process"

    @abstractmethod
    def grant(self, ratio: float) -> Share: ...

    def worker_env(self, share: Share) -> dict[str, str]:
        return {}

    def enter(self, share: Share) -> int | None:
        return None

    def neighbour_share(self, share: Share) -> Share | None:
        return None

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    def __enter__(self) -> "Partition":
        self.setup()
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()


def check_ratio(ratio: float) -> float:
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0 < ratio <= 100):
        raise ConfigError(f"ratio must be a percentage in (0, 100], got {ratio!r}")
    return float(ratio)


def parse_ratios(text: str) -> list[float]:
    """``"25,50,100"`` -> [100.0, 50.0, 25.0]: descending, so the whole-device config exists
    before the shares that reuse it as a seed and as the comparison."""
    out = []
    for part in str(text).split(","):
        part = part.strip().rstrip("%")
        if not part:
            continue
        try:
            r = float(part)
        except ValueError:
            raise ConfigError(f"--ratios: {part!r} is not a number (expected e.g. 25,50,100)") from None
        check_ratio(r)
        if r not in out:
            out.append(r)
    if not out:
        raise ConfigError("--ratios: no ratio given (expected e.g. 25,50,100)")
    return sorted(out, reverse=True)


class CpuPartition(Partition):
    """A set of whole CPU cores, with TVM's thread pool sized to match.

    The ratio is a fraction of the cores this process may use (``sched_getaffinity``), rounded to
    the nearest whole core and at least one. Cores are taken from the start of the sorted set, so
    the neighbour gets the rest.
    """

    kind = "cpu"
    scope = "in-process"

    def __init__(self, cores: list[int] | None = None):
        self.cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
        if not self.cores:
            raise DeviceError("no CPU cores available to this process")

    def units_for(self, ratio: float) -> int:
        n = len(self.cores)
        return min(n, max(1, round(check_ratio(ratio) / 100.0 * n)))

    def grant(self, ratio: float) -> Share:
        k = self.units_for(ratio)
        return Share("cpu", float(ratio), k, len(self.cores), "core", tuple(self.cores[:k]))

    def worker_env(self, share: Share) -> dict[str, str]:
        n = str(share.units)
        # TVM_BIND_THREADS=0: TVM would otherwise pin its threads by core frequency order, which
        # can put them on cores outside our set; unbound, they inherit the worker's affinity.
        return {"TVM_NUM_THREADS": n, "TVM_BIND_THREADS": "0", "OMP_NUM_THREADS": n,
                "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n}

    def enter(self, share: Share) -> int:
        os.sched_setaffinity(0, share.cores)
        try:
            import tvm

            tvm.get_global_func("runtime.config_threadpool")(0, share.units)
        except Exception:  # runtime without the thread pool hook: the env already sized it
            pass
        return len(os.sched_getaffinity(0))

    def neighbour_share(self, share: Share) -> Share | None:
        rest = tuple(c for c in self.cores if c not in share.cores)
        if not rest:
            return None
        return Share("cpu", 100.0 * len(rest) / len(self.cores), len(rest), len(self.cores), "core", rest)


PARTITIONS = ("cpu", "mps", "green")


def create_partition(kind: str | Partition, **kwargs) -> Partition:
    """A partition by name (``cpu``, ``mps``, ``green``) or the instance given."""
    if isinstance(kind, Partition):
        return kind
    if kind == "cpu":
        return CpuPartition(**kwargs)
    if kind in ("mps", "green"):
        from . import gpu_partition

        return gpu_partition.create(kind, **kwargs)
    raise ConfigError(f"unknown partition {kind!r} (known: {', '.join(PARTITIONS)})")
