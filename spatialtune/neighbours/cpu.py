"""CPU neighbours: ``compute`` (a cache-resident GEMM) and ``memory`` (a streaming copy far larger
than the last-level cache), in their own process on the cores the measured share leaves free."""

from __future__ import annotations

import mmap
import sys

from ..errors import ConfigError
from ..terms import CPU_NEIGHBOURS
from .base import PROGRESS_SIZE, ProcessNeighbour, publish


class CpuNeighbour(ProcessNeighbour):
    """``compute``: a 256x256 float32 GEMM that lives in cache; ``memory``: copies of a 256 MiB
    buffer. Both through numpy with as many threads as the neighbour has cores."""

    def __init__(self, kind: str, partition):
        if kind not in CPU_NEIGHBOURS:
            raise ConfigError(f"unknown CPU interference {kind!r} (known: none, {', '.join(CPU_NEIGHBOURS)})")
        super().__init__(kind, "GFLOP/s" if kind == "compute" else "GB/s")
        self.kind, self.partition = kind, partition

    def command(self, share):
        rest = self.partition.neighbour_share(share)
        cores = rest.cores if rest is not None else share.cores
        n = str(len(cores))
        env = {"OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n}
        return [sys.executable, "-m", "spatialtune.neighbours.cpu", self.kind], env, tuple(cores)


# ---------------------------------------------------------------- the neighbour process


def _cpu_main(kind: str, path: str) -> None:
    import numpy as np

    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), PROGRESS_SIZE)
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
            publish(mm, work)


if __name__ == "__main__":
    _cpu_main(sys.argv[1], sys.argv[2])
