"""The thread count of numpy's BLAS (OpenBLAS), changed at run time inside a measuring worker.

Why a measuring worker needs this: OpenBLAS's threads spin (yielding) for a while after each call
before they sleep, and TVM's pool threads do the same after each kernel. With both pools on the
share's cores:

- a float64 reference computed on several BLAS threads right before a kernel is timed puts slow
  outliers into its repeats and can move its median; on one BLAS thread it does not;
- numpy timed right after a TVM kernel runs several times slower while TVM's threads still spin,
  and not once they have gone quiet.

So a worker computes its references on one BLAS thread, and the numpy baseline gets the share's
threads for its own timing only, after TVM's pool has gone quiet (:func:`measure.vendor.measure_numpy`).
Without OpenBLAS (numpy built on another BLAS), nothing is changed and ``available()`` says so.
"""

from __future__ import annotations

import ctypes
import logging
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

# numpy >= 2 wheels ship scipy-openblas (64-bit ints, prefixed symbols); older ones and distro
# builds export OpenBLAS's own names.
_SYMBOLS = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
            ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
            ("openblas_set_num_threads", "openblas_get_num_threads"))

_found: list = []  # [(set, get)] once looked up, [None] when there is no OpenBLAS


def _calls():
    if not _found:
        import numpy  # noqa: F401  (loads its BLAS)

        calls = None
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
        for path in paths:
            lib = ctypes.CDLL(path)
            for set_name, get_name in _SYMBOLS:
                if hasattr(lib, set_name) and hasattr(lib, get_name):
                    calls = (getattr(lib, set_name), getattr(lib, get_name))
                    calls[0].argtypes, calls[0].restype = [ctypes.c_int], None
                    calls[1].argtypes, calls[1].restype = [], ctypes.c_int
                    break
            if calls:
                break
        if calls is None:
            log.info("numpy's BLAS is not OpenBLAS: its thread count is left as it is")
        _found.append(calls)
    return _found[0]


def available() -> bool:
    return _calls() is not None


def get_threads() -> int | None:
    calls = _calls()
    return int(calls[1]()) if calls else None


def set_threads(n: int) -> None:
    calls = _calls()
    if calls:
        calls[0](max(1, int(n)))


@contextmanager
def threads(n: int) -> Iterator[None]:
    """BLAS on ``n`` threads inside the block, the count before it afterwards."""
    before = get_threads()
    set_threads(n)
    try:
        yield
    finally:
        if before is not None:
            set_threads(before)
