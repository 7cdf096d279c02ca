"""Confirming the winners of a key before they are handed out.

On a shared machine a kernel timed during a quiet moment looks faster than it is (the same
kernel's time drifts by tens of percent over seconds on a busy host). The best stored config of
a key is what a lookup hands out, so after a key's search the ``top`` fastest kernels are
measured again, ``rounds`` times interleaved, and each one's time becomes the median of all its
repeats (``TuningDatabase.add_times``): a lucky measurement no longer decides the winner alone.
A short search confirms fewer: at most a third of the key's kernels (at least 2), so confirming
never costs more measurements than the search made.

The repeats of a confirmation are appended after the kernel's first measurement, so what the
search saw when it measured the kernel stays readable (:func:`first_measurement_s`): a
benchmark that asks what a search held best after B trials must not use times taken after B.
"""

from __future__ import annotations

import logging

import numpy as np

from ..measure.builder import BuildInput
from ..measure.runner import RunInput
from ..search.space import candidate_from_trace
from .context import TuneContext

log = logging.getLogger(__name__)


def first_measurement_s(m, repeat: int) -> float | None:
    """The median of ``m``'s first measurement: its first ``repeat`` times (the run settings'
    ``repeat`` it was measured with), before any confirmation's; None without times."""
    first = m.times[:max(1, int(repeat))]
    return float(np.median(first)) if first else None


def confirm_best(ctx: TuneContext, *, top: int = 4, rounds: int = 2) -> int:
    """Re-measure the ``top`` fastest kernels under ``ctx.key``; returns how many were confirmed."""
    db, workload, key = ctx.db, ctx.workload, ctx.key
    ok = db.measurements(**key, status="ok")
    rows = sorted(ok, key=lambda m: m.median_s)[:min(top, max(2, len(ok) // 3))]
    if len(rows) < 2 or rounds < 1:
        return 0
    cands = [candidate_from_trace(workload, m.trace, "confirm", expect_hash=m.mod_hash) for m in rows]
    keep = [(m, c) for m, c in zip(rows, cands) if c is not None]
    built = ctx.builder.build([BuildInput.of(c, workload.key, workload.fast_math) for _, c in keep], ctx.target)
    keep = [(m, b) for (m, _), b in zip(keep, built) if b.ok]
    extra: dict[int, list[float]] = {i: [] for i in range(len(keep))}
    for _ in range(rounds):
        res = ctx.runner.run(ctx.share, key["interference"],
                             [RunInput(workload.to_dict(), b.artifact, b.cubin, m.mod_hash) for m, b in keep])
        for i, r in enumerate(res):
            if r.status == "ok":
                extra[i] += r.times
    for i, (m, _) in enumerate(keep):
        if extra[i]:
            db.add_times(m, extra[i])
    log.info("%s @ %g%%: confirmed the %d fastest kernels", workload.key, key["ratio"], len(keep))
    return len(keep)
