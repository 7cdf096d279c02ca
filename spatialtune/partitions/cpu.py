"""CPU core sets: a share is a set of whole cores, with TVM's thread pool sized to match."""

from __future__ import annotations

import os

from ..errors import DeviceError
from ..terms import Share, check_ratio
from .base import Partition


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
        # Every thread of the worker, not only the calling one: a BLAS loaded before this point
        # (numpy's OpenBLAS starts its pool at import) would keep its threads on every core.
        # Threads started later inherit the mask of the thread that starts them.
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), share.cores)
            except (ProcessLookupError, PermissionError):  # a thread that just ended
                pass
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
