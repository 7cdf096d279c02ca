"""Evolutionary search over a design space, ranked by our cost model for one share.

:class:`EvolutionarySearch` drives MetaSchedule's own machinery: the ``post-order-apply`` design
spaces, its ``EvolutionarySearch`` strategy (C++) with the target's mutators and postprocessors,
and a cost model of ours behind MetaSchedule's ``PyCostModel`` interface. It fixes what that
strategy assumes and we cannot give it as is:

- **Scores.** The strategy picks parents in proportion to the score clamped at 0 and keeps the
  best-scoring candidates across its iterations; our model's :meth:`~.cost_model.CostModel.score`
  is a predicted relative throughput in (0, 1] (random before the model is trained).
- **Measured kernels.** The strategy only knows what it handed out itself, so kernels measured
  earlier (read from the database) come back out of it. It is asked for enough candidates to
  cover those; they are dropped, and the fresh ones not used yet wait in a pool that is re-ranked
  with the newest model at the next ``ask``. Repeats never end the search.
- **Exploration.** MetaSchedule's epsilon-greedy share rounds down to zero random picks at small
  batches. Here a fraction ``explore`` of every batch (carried over between batches, so it adds
  up at any batch size) is drawn uniformly from the design space (:mod:`.uniform`).
- **Neighbours of the best.** A fraction ``local`` of every batch are single mutations (the
  target's own mutators: a tile factor moved, another unroll depth, ...) of this share's fastest
  kernels, chosen at random and not by the model. The model-ranked evolution left a dense at
  5.2 ms on 2 cores for 150 trials while one tile move of its best (an innermost tile of 16 output columns instead of 8)
  was 3.0 ms; a model that has not seen a move work ranks it low, so it is never tried.
- **Batches.** The strategy would hand out its n best-predicted candidates, often one tile size
  apart; the rest of a batch is picked among the 2n best for predicted speed and new knob
  values (``diversity``, :func:`diverse_pick`).
- **Seeds.** ``measured`` are (trace, time) of this share; ``seeds`` are configs of other shares
  whose times the caller has put on this share's scale (:mod:`.policy`). Both enter the
  strategy's database, so the best of them are parents of the first population.

A kernel is identified by the structural hash of its scheduled IRModule; ``ask`` never returns
one already measured under this share (the resume guarantee rests on that).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import first_line
from ..workloads.schedule import mod_hash
from .cost_model import CostModel, with_share
from .space import Candidate, DesignSpace, Search, stamp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvolutionConfig:
    population: int = 256  # MetaSchedule's default is 512
    genetic_iters: int = 3  # MetaSchedule's default is 4
    mutate_prob: float = 0.85
    init_measured_ratio: float = 0.2  # of the first population, taken from the best measured
    explore: float = 0.15  # fraction of each batch drawn uniformly from the design space
    local: float = 0.125  # fraction of each batch that are random single mutations of the best kernels
    # Weight of novelty when a batch is picked from the best-predicted candidates (0: plain top-n);
    # see diverse_pick.
    diversity: float = 1.0
    # On a CPU target, a second design space that packs a matmul's transposed operand into
    # vector-wide panels (search.rules.PackPanels; False: MetaSchedule's own spaces only).
    pack_panels: bool = True
    # CPU: this many candidates of a share's first batches (up to half of each) are uniform samples
    # given a register tile (search.seeds); 0: none. Not when other shares' configs seed the share.
    tile_seeds: int = 16


@dataclass(frozen=True)
class SearchRun:
    """How one search runs, apart from what it searches: the candidates it hands out per batch,
    its random seed and the evolution's threads (None: this process's cores; 1 makes a search
    reproducible from its seed and its measurements). :class:`~.policy.SharePolicy` is given the
    job's seed and derives its search's own from it and the key."""

    batch: int = 16
    seed: int = 0
    threads: int | None = None


class EvolutionarySearch(Search):
    def __init__(self, workload, target: dict, cost_model: CostModel, *,
                 measured: Sequence[tuple[str, float | None]] = (), seeds: Sequence[tuple[str, float]] = (),
                 config: EvolutionConfig = EvolutionConfig(), share_units: tuple[int, int] = (1, 1),
                 run: SearchRun = SearchRun()):
        """``measured``: (trace, time or None) already measured under this share; ``seeds``:
        (trace, time on this share's scale) of other shares, best first; ``share_units``: (units
        granted, units of the whole device), the share features of the cost model."""
        from tvm.s_tir import meta_schedule as ms

        t0 = time.perf_counter()
        self.workload, self.cost_model, self.batch, self.config = workload, cost_model, max(1, run.batch), config
        self.share_units = share_units
        self.rand_state = rand_state = run.seed
        self._ms = ms
        self.space = DesignSpace(workload, target, rand_state=rand_state, pack_panels=config.pack_panels,
                                 threads=run.threads or len(os.sched_getaffinity(0)),
                                 strategy=ms.search_strategy.EvolutionarySearch(
                                     population_size=config.population, init_measured_ratio=config.init_measured_ratio,
                                     init_min_unmeasured=min(config.population, max(16, self.batch)),
                                     genetic_num_iters=config.genetic_iters, genetic_mutate_prob=config.mutate_prob,
                                     eps_greedy=0.0, max_fail_count=10))
        self.msdb = ms.database.MemoryDatabase()
        self.ms_workload = self.msdb.commit_workload(self.space.mod)
        self.measured: set[str] = set()
        self._fastest: list[tuple[float, str]] = []  # (time, trace) of this share's kernels, fastest first
        self._n_ok = 0
        self._parents: dict[str, object] = {}  # trace -> its replayed Schedule (see _from_neighbours)
        self._mutators = self._mutator_p = None
        for trace, t in measured:
            sch = self._commit(trace, t)
            if sch is not None:
                self.measured.add(mod_hash(sch.mod))
                self._note_time(trace, t)
        for trace, t in seeds:
            self._commit(trace, t)
        # transferred configs already carry what the register tiles would bring
        self._tile_left = config.tile_seeds if not seeds and len(self.measured) < config.tile_seeds else 0
        # Enough per generation to cover the measured kernels that can come back (they are parents)
        per_iter = self.batch + min(len(self.measured), int(config.population * config.init_measured_ratio))
        self.strategy = self.space.ctx.search_strategy
        self.strategy.pre_tuning(max_trials=1 << 30, num_trials_per_iter=per_iter, design_spaces=self.space.spaces,
                                 database=self.msdb, cost_model=_ms_cost_model(self))
        self.pool: list[Candidate] = []
        self._uniform = None
        self._explore_credit = 0.0
        self._local_credit = 0.0
        self._rng = np.random.default_rng(rand_state)
        self._evolution_done = False
        self.setup_s = time.perf_counter() - t0

    # -- scores for MetaSchedule ---------------------------------------------------------------

    def _features(self, feats: np.ndarray) -> np.ndarray:
        return with_share(feats, *self.share_units)

    def scores(self, feats: np.ndarray) -> np.ndarray:
        return np.asarray(self.cost_model.score(self._features(feats)), dtype="float64")

    # -- the strategy's database ---------------------------------------------------------------

    def _commit(self, trace: str, t: float | None):
        sch = self.space.replay(trace)
        if sch is not None and t is not None and np.isfinite(t) and t > 0:
            ms = self._ms
            self.msdb.commit_tuning_record(ms.database.TuningRecord(
                sch.trace, self.ms_workload, run_secs=[float(t)], target=self.space.target,
                args_info=self.space.args_info))
        return sch

    # -- ask / tell ----------------------------------------------------------------------------

    def ask(self, n: int) -> list[Candidate]:
        t0 = time.perf_counter()
        self._explore_credit += self.config.explore * n
        n_rand = min(n, int(self._explore_credit))
        self._explore_credit -= n_rand
        self._local_credit += self.config.local * n
        n_local = min(n - n_rand, int(self._local_credit))
        local = self._from_neighbours(n_local)
        # what could not be drawn (no kernel measured yet) is owed for one batch at most
        self._local_credit = min(self._local_credit - len(local), max(1.0, self.config.local * n))
        tiles = self._from_tile_seeds(min(self._tile_left, (n - n_rand - len(local)) // 2 if n > 1 else 0))
        out = local + tiles
        out += self._from_evolution(n - n_rand - len(out), exclude={c.mod_hash for c in out})
        out += self._from_uniform(n - len(out), exclude={c.mod_hash for c in out})
        return stamp(out, t0)

    # -- neighbours of the fastest kernels -------------------------------------------------------

    LOCAL_PARENTS = 4  # the fastest kernels whose neighbours are tried, the fastest most often
    # Neighbours only once this many batches of the share are measured: the first kernels are
    # poor and so are their neighbours (on the one-core replayed comparison with uniform sampling,
    # 48 trials, neighbours from the first batch on left the search behind uniform sampling).
    LOCAL_AFTER_BATCHES = 2

    def _note_time(self, trace: str, t: float | None) -> None:
        if trace and t is not None and np.isfinite(t) and t > 0:
            self._n_ok += 1
            self._fastest.append((float(t), trace))
            self._fastest.sort(key=lambda x: x[0])
            del self._fastest[self.LOCAL_PARENTS:]

    def _from_neighbours(self, n: int) -> list[Candidate]:
        """Up to ``n`` unmeasured single mutations of the fastest kernels of this share (fewer
        when there are none yet, or when mutations keep landing on measured kernels)."""
        if n <= 0 or self._n_ok < self.LOCAL_AFTER_BATCHES * self.batch:
            return []
        ffi = self._ms._ffi_api
        gen = self.space.ctx.space_generator
        if self._mutators is None:
            self._mutators = list(gen.mutator_probs)
            p = np.asarray([float(v) for v in gen.mutator_probs.values()])
            self._mutator_p = p / p.sum()
        # the parents' schedules, replayed once while they stay among the fastest
        self._parents = {tr: self._parents.get(tr) or self.space.replay(tr) for _, tr in self._fastest}
        rank_w = np.asarray([1.0 / (i + 1) for i in range(len(self._fastest))])
        out: list[Candidate] = []
        taken = self.measured | {c.mod_hash for c in self.pool}
        for _ in range(8 * n):
            if len(out) >= n:
                break
            i = int(self._rng.choice(len(self._fastest), p=rank_w / rank_w.sum()))
            parent = self._parents[self._fastest[i][1]]
            if parent is None:
                continue
            mut = self._mutators[int(self._rng.choice(len(self._mutators), p=self._mutator_p))]
            # a seed of ours, not TVM's -1 (a device-random seed): a search stays reproducible
            trace = ffi.MutatorApply(mut, parent.trace, int(self._rng.integers(1, 2**31 - 1)))
            if trace is None:
                continue
            sch = self.space.apply(trace)
            if sch is None:  # a mutation the postprocessors or the replay reject
                continue
            h = mod_hash(sch.mod)
            if h in taken:
                continue
            taken.add(h)
            out.append(self.space.candidate(sch, "local"))
        return out

    def _from_tile_seeds(self, n: int) -> list[Candidate]:
        if n <= 0:
            return []
        from .seeds import register_tile_seeds

        sampler = self._uniform_sampler()
        got = register_tile_seeds(sampler.space, sampler.sample(4 * n, exclude=self.measured), n, self._rng,
                                  exclude=self.measured | {c.mod_hash for c in self.pool})
        # none where nothing takes a register tile (a GPU target, an elementwise operator)
        self._tile_left = self._tile_left - len(got) if got else 0
        return got

    def _uniform_sampler(self):
        if self._uniform is None:
            from .uniform import UniformSampler

            self._uniform = UniformSampler(self.workload, self.space.target_dict, seed=self.rand_state,
                                           pack_panels=self.config.pack_panels)
        return self._uniform

    def _from_evolution(self, n: int, exclude: set[str] = frozenset()) -> list[Candidate]:
        if n <= 0:
            return []
        if exclude:
            self.pool = [c for c in self.pool if c.mod_hash not in exclude]
        tries = 0
        while len(self.pool) < n and not self._evolution_done and tries < 4:
            tries += 1
            try:
                got = self.strategy.generate_measure_candidates()
            except Exception as e:  # a check failing inside TVM's evolution: this key samples instead
                self._evolution_done = True
                log.warning("%s: MetaSchedule's evolution failed (%s); sampling uniformly for this key",
                            self.workload.key, first_line(e))
                break
            if not got:
                self._evolution_done = True
                log.info("%s: MetaSchedule's evolution has nothing more; sampling uniformly", self.workload.key)
                break
            fresh, stale = [], []
            known = self.measured | {c.mod_hash for c in self.pool} | exclude
            for c in got:
                h = mod_hash(c.sch.mod)
                (stale if h in known else fresh).append(c)
                known.add(h)
            if stale:  # keep the strategy's count of handed-out candidates in step
                self.strategy.notify_runner_results(stale, [self._ms.runner.RunnerResult(None, "duplicate")] * len(stale))
            if fresh:
                feats = self.space.features_of(fresh)
                self.pool += [self.space.candidate(c.sch, "search", c, f) for c, f in zip(fresh, feats)]
        if not self.pool:
            return []
        # the newest model ranks everything waiting, from this generation and earlier ones
        order = np.argsort(-self.cost_model.predict(self._features(np.stack([c.features for c in self.pool]))),
                           kind="stable")
        ranked = [self.pool[i] for i in order]
        if self.config.diversity > 0 and n > 1:
            picked = diverse_pick([decisions(c) for c in ranked[: DIVERSITY_FILTER * n]], n, self.config.diversity)
            chosen, gone = [ranked[i] for i in picked], set(picked)
            rest = [c for i, c in enumerate(ranked) if i not in gone]
        else:
            chosen, rest = ranked[:n], ranked[n:]
        self.pool = rest[: 4 * self.batch]
        return chosen

    def _from_uniform(self, n: int, exclude: set[str] = frozenset()) -> list[Candidate]:
        if n <= 0:
            return []
        got = self._uniform_sampler().sample(n, exclude=self.measured | {c.mod_hash for c in self.pool} | exclude)
        for c in got:
            c.source = "explore"
        return got

    def replayed(self, traces: Sequence[str], source: str = "transfer") -> list[Candidate]:
        """Candidates replayed from traces tuned elsewhere, skipping any measured here."""
        out: list[Candidate] = []
        for tr in traces:
            sch = self.space.replay(tr)
            if sch is None:
                continue
            h = mod_hash(sch.mod)
            if h not in self.measured and all(o.mod_hash != h for o in out):
                out.append(self.space.candidate(sch, source))
        return out

    def tell(self, candidates: Sequence[Candidate], times: Sequence[float | None]) -> None:
        ms_cands, ms_results = [], []
        for c, t in zip(candidates, times):
            self.measured.add(c.mod_hash)
            ok = t is not None and np.isfinite(t) and t > 0
            if c.trace:
                self._commit(c.trace, t if ok else None)
                self._note_time(c.trace, t if ok else None)
            if c._ms is not None:
                ms_cands.append(c._ms)
                ms_results.append(self._ms.runner.RunnerResult([float(t)] if ok else None, None if ok else "failed"))
        if ms_cands:
            self.strategy.notify_runner_results(ms_cands, ms_results)

    def close(self) -> None:
        try:
            self.strategy.post_tuning()
        except Exception:
            pass


DIVERSITY_FILTER = 2  # a batch of n is picked among the 2n best-predicted candidates


def decisions(c: Candidate) -> dict[tuple[str, int], str]:
    """The sampling decisions of a candidate's trace (tile sizes, unroll depth, ...), keyed by
    the instruction kind and its position among that kind: the tuning knobs of MetaSchedule."""
    out: dict[tuple[str, int], str] = {}
    if c._ms is None:
        return out
    trace = c._ms.sch.trace
    seen: dict[str, int] = {}
    for inst in trace.insts:
        if inst in trace.decisions:
            kind = inst.kind.name
            seen[kind] = seen.get(kind, -1) + 1
            out[kind, seen[kind]] = str(trace.decisions[inst])
    return out


def diverse_pick(knobs: Sequence[dict], n: int, weight: float) -> list[int]:
    """Indices of ``n`` of ``knobs`` (given best-predicted first): greedily, the candidate with
    the most of rank score (1 for the first, falling linearly) plus ``weight`` x the fraction of
    its knobs whose value no candidate picked so far has. AutoTVM's diversity-aware selection
    (Chen et al., NeurIPS 2018): the n best-predicted kernels are often one tile size apart, so a
    batch of them measures one point of the space n times over while the model is still guessing."""
    m = len(knobs)
    n = min(n, m)
    taken: dict[tuple, set] = {}
    left, out = list(range(m)), []
    for _ in range(n):
        def gain(i: int) -> float:
            ks = knobs[i]
            new = sum(1 for k, v in ks.items() if v not in taken.get(k, ()))
            return (1.0 - i / m) + weight * (new / len(ks) if ks else 0.0)
        best = max(left, key=gain)  # ties: the better-predicted (max keeps the first)
        out.append(best)
        left.remove(best)
        for k, v in knobs[best].items():
            taken.setdefault(k, set()).add(v)
    return out


def _make_adapter():
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class _Adapter(ms.cost_model.PyCostModel):
        """Lets MetaSchedule's evolution rank with our per-share model."""

        def __init__(self, search: "EvolutionarySearch"):
            super().__init__()
            self.search = search

        def load(self, path: str) -> None:
            pass

        def save(self, path: str) -> None:
            pass

        def update(self, context, candidates, results) -> None:
            pass  # trained by the tuning loop from the database, across workloads and shares

        def predict(self, context, candidates) -> np.ndarray:
            if not candidates:
                return np.zeros(0)
            return self.search.scores(self.search.space.features_of(candidates))

    return _Adapter


_ADAPTER = None


def _ms_cost_model(search):
    global _ADAPTER
    if _ADAPTER is None:
        _ADAPTER = _make_adapter()
    return _ADAPTER(search)
