"""Uniform samples of a design space: every sampling decision drawn at random, no cost model.

The exploration part of every search batch, the extra samples of a GPU round, and the baseline
the search is benchmarked against all come from here (MetaSchedule's ``ReplayTrace`` strategy).
:class:`UniformSampler` is a :class:`~.space.Search` like the evolutionary search, so a benchmark
or a driver can run either through the same ask/tell loop; the evolutionary search draws its
uniform fraction through :meth:`UniformSampler.sample`, with its own exclusions each time.
"""

from __future__ import annotations

import logging
import time
from typing import Collection, Sequence

from ..errors import first_line
from ..workloads.schedule import mod_hash
from .space import Candidate, DesignSpace, Search, stamp

log = logging.getLogger(__name__)


class UniformSampler(Search):
    """Draws candidates uniformly from a workload's design space, never one in ``exclude`` and
    never the same one twice.

    As a :class:`~.space.Search`: ``measured`` (mod hashes: the kernels measured already, given as
    ``exclude`` and told since) are never proposed, and ``tell`` teaches it nothing else, since no
    draw depends on a time."""

    def __init__(self, workload, target: dict, *, seed: int = 0, chunk: int = 64, pack_panels: bool = True,
                 exclude: Collection[str] = ()):
        from tvm.s_tir import meta_schedule as ms

        self.space = DesignSpace(workload, target, rand_state=(seed * 7919 + 17) % (2**31 - 1), pack_panels=pack_panels,
                                 strategy=ms.search_strategy.ReplayTrace(max_fail_count=2000))
        self.chunk = chunk
        self.seen: set[str] = set()  # every kernel proposed
        self.measured: set[str] = set(exclude)
        self._buffer: list = []
        self._dry = 0

    def ask(self, n: int) -> list[Candidate]:
        """Up to ``n`` candidates neither proposed nor measured before; empty once the space seems
        exhausted."""
        return self.sample(n, exclude=self.measured)

    def tell(self, candidates: Sequence[Candidate], times: Sequence[float | None]) -> None:
        self.measured.update(c.mod_hash for c in candidates)

    @property
    def strategy(self):
        """MetaSchedule's ``ReplayTrace`` over this space: what draws the samples."""
        return self.space.ctx.search_strategy

    def _refill(self) -> None:
        strat = self.strategy
        strat.pre_tuning(max_trials=self.chunk, num_trials_per_iter=self.chunk, design_spaces=self.space.spaces)
        try:
            got = strat.generate_measure_candidates() or []
        except Exception as e:  # a check failing inside TVM's sampling: this chunk is lost, not the job
            got = []
            log.warning("%s: MetaSchedule's sampling failed (%s); %s", self.space.workload.key,
                        first_line(e),
                        "trying another chunk" if self._dry < 2 else "no more samples for this key")
        finally:
            strat.post_tuning()
        self._buffer.extend(got)

    def sample(self, n: int, exclude: Collection[str] = ()) -> list[Candidate]:
        """Up to ``n`` new candidates (fewer only when the space seems exhausted)."""
        t0 = time.perf_counter()
        out: list[Candidate] = []
        while len(out) < n and self._dry < 3:
            if not self._buffer:
                self._refill()
                if not self._buffer:
                    self._dry += 1
                    continue
            fresh = 0
            while self._buffer and len(out) < n:
                c = self._buffer.pop()
                h = mod_hash(c.sch.mod)
                if h in self.seen or h in exclude:
                    continue
                self.seen.add(h)
                out.append(self.space.candidate(c.sch, "explore"))
                fresh += 1
            if not fresh and not self._buffer:
                self._dry += 1  # a whole chunk of repeats: a small space, nearly exhausted
        return stamp(out, t0)
