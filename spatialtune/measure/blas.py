"""The thread count of numpy's BLAS (OpenBLAS), changed at run time inside a measuring worker.

Why a measuring worker needs this: OpenBLAS's threads spin (yielding) for a while after each call
before they sleep, and TVM's pool threads do the same after each kernel. On the 2-core VM of the
benchmarks, with both pools on the share's cores:

- the float64 reference computed on two BLAS threads right before a kernel was timed put a
  repeat at 1.6-2x its median into 22 of 24 measurements (three 128x2304x768 dense kernels of
  3.8-4.4 ms, eight measurements each, five 20 ms repeats per measurement; 12 of 24 in a second
  run) and now and then moved the median (5.67 ms for a 4.3 ms kernel); with the reference on one
  BLAS thread, none of 48 such measurements had a repeat above 1.52x its median;
- numpy timed within 0.1 s of a TVM kernel ran 10x slow (32 ms instead of 3) in about a third of
  the timings, and never after 0.3 s of quiet.

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
