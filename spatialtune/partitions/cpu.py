"""CPU core sets: a share is a set of whole cores, with TVM's thread pool sized to match."""

from __future__ import annotations

import os

from ..errors import DeviceError
from ..terms import Share, check_ratio
from .base import Partition


_ONE_CORE_PER_THREAD = -2  # tvm::runtime::threading::ThreadGroup::kSpecifyOneCorePerThread


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
        return {"TVM_NUM_THREADS": n, "OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n}

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
        except ImportError:
            return len(os.sched_getaffinity(0))
        # One TVM thread per granted core, each bound to its own core (TVM's "specify one core
        # per thread" mode; task 0 runs on this thread, bound to the first core). Left to the OS,
        # the two threads of a 2-core share sometimes shared a core: up to 2x slower, at random.
        cores = [str(c) for c in share.cores]
        tvm.get_global_func("runtime.config_threadpool")(_ONE_CORE_PER_THREAD, share.units, cores)
        pin = tvm.get_global_func("tvm.runtime.threading.set_current_thread_affinity", allow_missing=True)
        if pin is not None:
            pin(tvm.runtime.ShapeTuple([share.cores[0]]))
        return len(share.cores)

    def neighbour_share(self, share: Share) -> Share | None:
        rest = tuple(c for c in self.cores if c not in share.cores)
        if not rest:
            return None
        return Share("cpu", 100.0 * len(rest) / len(self.cores), len(rest), len(self.cores), "core", rest)
