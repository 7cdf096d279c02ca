"""Shares of a GPU's SMs: the ratio <-> SM mapping of each mechanism, and their common base.

Ratio <-> SM mapping lives only here: :func:`sms_for_ratio` / :func:`ratio_for_sms` (green
contexts, 8-SM steps on Hopper) and :func:`mps_sms_for_ratio` (MPS rounds up).
"""

from __future__ import annotations

import math

from ..errors import ConfigError
from ..terms import check_ratio
from .base import Partition

GREEN_STEP = 8  # SM granularity of green-context splits on Hopper


def sms_for_ratio(ratio: float, total: int, step: int = GREEN_STEP) -> int:
    """SMs a green context gets for ``ratio`` percent: the whole device at 100, else the nearest
    multiple of ``step`` (at least one step, at most the largest multiple below ``total``)."""
    ratio = check_ratio(ratio)
    if ratio >= 100 or total <= step:
        return total
    n = int(round(ratio / 100.0 * total / step)) * step
    return max(step, min(n, (total - 1) // step * step))


def ratio_for_sms(sms: int, total: int) -> float:
    """The ratio that maps back to ``sms`` (exactly, for multiples of the step and for ``total``)."""
    if not 0 < sms <= total:
        raise ConfigError(f"SM count must be in 1..{total}, got {sms}")
    return 100.0 if sms == total else round(100.0 * sms / total, 4)


def mps_sms_for_ratio(ratio: float, total: int) -> int:
    """SMs MPS gives a client at ``ratio`` percent (it rounds up); the worker reports what it sees."""
    return max(1, min(total, math.ceil(check_ratio(ratio) / 100.0 * total)))


class SmPartition(Partition):
    """A share of a GPU's SMs; the device is asked for its SM count on first use, so building a
    partition object (CLI parsing, tests) never touches the driver."""

    _total: int | None = None

    @property
    def total(self) -> int:
        if self._total is None:
            from ..cuda.driver import sm_count

            self._total = sm_count()
        return self._total
