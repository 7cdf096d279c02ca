"""Search: propose candidate kernels for one workload under one share (ask), learn from their
measurements (tell).

:class:`EvolutionarySearch` drives MetaSchedule's own machinery: the ``post-order-apply`` design
space of the target, MetaSchedule's ``EvolutionarySearch`` strategy with its mutators, and our
cost model (per share) behind MetaSchedule's ``PyCostModel`` interface. Its memory database holds
what was already measured under this share, so evolution starts from the best measured kernels,
plus *seeds*: kernels measured under other shares of the same workload, which MetaSchedule treats
as measured and uses as parents. :meth:`transfer` turns such seeds into candidates to be measured
directly under this share: that is how the whole-device config is measured at every share.

A kernel is identified by the structural hash of its scheduled IRModule; ``ask`` never returns
one already measured under this share (the resume guarantee rests on that).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .cost_model import CostModel, pool_features

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    mod_hash: str
    trace: str  # tvm.ir.save_json of the MetaSchedule trace (re-applied by apply_trace)
    mod_json: str  # tvm.ir.save_json of the scheduled module (what the builder compiles)
    features: np.ndarray | None
    source: str  # search | transfer | default
    search_s: float = 0.0
    _ms: object = None  # the MetaSchedule MeasureCandidate, for tell()


class Search(ABC):
    """Ask/tell contract: ``ask(n)`` returns at most n new candidates (an empty list means the
    space is exhausted); each must be passed back once through ``tell`` with its time in seconds
    (None for a failure) before the next ``ask``."""

    @abstractmethod
    def ask(self, n: int) -> list[Candidate]: ...

    @abstractmethod
    def tell(self, candidates: Sequence[Candidate], times: Sequence[float | None]) -> None: ...


def mod_hash(mod) -> str:
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod) & 0xFFFFFFFFFFFFFFFF:016x}"


def trace_to_json(trace) -> str:
    import tvm

    return tvm.ir.save_json(trace.as_json())


def apply_trace(workload, trace_json: str):
    """A Schedule of ``workload`` with a stored trace replayed on it."""
    import tvm
    from tvm.s_tir import Schedule, Trace

    _ensure_intrinsics()
    sch = Schedule(workload.ir_module())
    Trace.apply_json_to_schedule(tvm.ir.load_json(trace_json), sch)
    return sch


def _ensure_intrinsics() -> None:
    # Traces of tensorized kernels name intrinsics registered by this import (slow, once).
    import tvm.s_tir.tensor_intrin  # noqa: F401


def default_candidate(workload) -> Candidate:
    """TVM's untuned default: the unscheduled PrimFunc as tvm.compile takes it."""
    import tvm

    mod = workload.ir_module()
    return Candidate(mod_hash=mod_hash(mod), trace="", mod_json=tvm.ir.save_json(mod), features=None,
                     source="default")


class EvolutionarySearch(Search):
    def __init__(self, workload, target: dict, cost_model: CostModel, *, measured: Sequence[tuple[str, float | None]] = (),
                 seeds: Sequence[tuple[str, float]] = (), batch: int = 16, population: int = 128,
                 genetic_iters: int = 3, rand_state: int = 0, threads: int = 1):
        """``measured``: (trace, time or None) already measured under this share;
        ``seeds``: (trace, time) measured under other shares, best first."""
        import tvm
        from tvm.s_tir import meta_schedule as ms

        self.workload, self.cost_model, self.batch = workload, cost_model, batch
        self._ms = ms
        t0 = time.perf_counter()
        self.mod = workload.ir_module()
        self.target = tvm.target.Target(target)
        self.ctx = ms.TuneContext(
            mod=self.mod, target=self.target, space_generator="post-order-apply",
            search_strategy=ms.search_strategy.EvolutionarySearch(
                population_size=population, init_measured_ratio=0.25, init_min_unmeasured=max(16, batch),
                genetic_num_iters=genetic_iters, genetic_mutate_prob=0.85, eps_greedy=0.1, max_fail_count=10),
            task_name=workload.key, rand_state=rand_state, num_threads=threads,
        )
        self.extractor = ms.feature_extractor.PerStoreFeature()
        spaces = self.ctx.space_generator.generate_design_space(self.mod)
        self.msdb = ms.database.MemoryDatabase()
        self.ms_workload = self.msdb.commit_workload(self.mod)
        self.measured: set[str] = set()
        for trace, t in measured:
            sch = self._commit(trace, t)
            if sch is not None:
                self.measured.add(mod_hash(sch.mod))
        for trace, t in seeds:
            self._commit(trace, t)
        self.strategy = self.ctx.search_strategy
        self.strategy.pre_tuning(max_trials=1 << 30, num_trials_per_iter=batch, design_spaces=spaces,
                                 database=self.msdb, cost_model=_MsCostModel(self))
        self.setup_s = time.perf_counter() - t0
        self._exhausted = False

    def _commit(self, trace: str, t: float | None):
        try:
            sch = apply_trace(self.workload, trace)
        except Exception as e:  # a trace from another TVM version: not a seed, not fatal
            log.debug("cannot replay a stored trace on %s: %s", self.workload.key, e)
            return None
        if t is not None and np.isfinite(t) and t > 0:
            rec = self._ms.database.TuningRecord(sch.trace, self.ms_workload, run_secs=[float(t)], target=self.target,
                                                 args_info=self._ms.arg_info.ArgInfo.from_prim_func(self.mod["main"]))
            self.msdb.commit_tuning_record(rec)
        return sch

    def features(self, schedules) -> np.ndarray:
        cands = [self._ms.MeasureCandidate(s, self._ms.arg_info.ArgInfo.from_prim_func(s.mod["main"]))
                 for s in schedules]
        if not cands:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([pool_features(f.numpy()) for f in self.extractor.extract_from(self.ctx, cands)])

    def _wrap(self, sch, source: str, ms_cand=None, search_s: float = 0.0) -> Candidate:
        import tvm

        return Candidate(mod_hash=mod_hash(sch.mod), trace=trace_to_json(sch.trace), mod_json=tvm.ir.save_json(sch.mod),
                         features=self.features([sch])[0], source=source, search_s=search_s, _ms=ms_cand)

    def ask(self, n: int) -> list[Candidate]:
        out: list[Candidate] = []
        tries = 0
        t0 = time.perf_counter()
        while len(out) < n and not self._exhausted and tries < 8:
            tries += 1
            got = self.strategy.generate_measure_candidates()
            if not got:
                self._exhausted = True
                break
            fresh, stale = [], []
            for c in got:
                h = mod_hash(c.sch.mod)
                if h in self.measured or any(o.mod_hash == h for o in out) or len(out) + len(fresh) >= n:
                    stale.append(c)
                else:
                    fresh.append((h, c))
            # MetaSchedule counts every candidate it hands out; tell it the duplicates failed so
            # its bookkeeping stays in step, without polluting the database.
            if stale:
                self.strategy.notify_runner_results(stale, [self._ms.runner.RunnerResult(None, "duplicate")] * len(stale))
            for h, c in fresh:
                out.append(self._wrap(c.sch, "search", c))
        per = (time.perf_counter() - t0) / max(1, len(out))
        for c in out:
            c.search_s = per
        return out

    def transfer(self, traces: Sequence[str]) -> list[Candidate]:
        """Candidates replayed from traces tuned elsewhere, skipping any measured here."""
        out = []
        for tr in traces:
            try:
                sch = apply_trace(self.workload, tr)
            except Exception as e:
                log.debug("transfer trace does not replay: %s", e)
                continue
            h = mod_hash(sch.mod)
            if h not in self.measured and all(o.mod_hash != h for o in out):
                out.append(self._wrap(sch, "transfer"))
        return out

    def tell(self, candidates: Sequence[Candidate], times: Sequence[float | None]) -> None:
        ms_cands, ms_results = [], []
        for c, t in zip(candidates, times):
            self.measured.add(c.mod_hash)
            ok = t is not None and np.isfinite(t) and t > 0
            if c.trace:
                self._commit(c.trace, t if ok else None)
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


def _make_ms_cost_model():
    from tvm.s_tir import meta_schedule as ms
    from tvm.ir.utils import derived_object

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
            pass  # trained by the tuning loop from the database, across workloads

        def predict(self, context, candidates) -> np.ndarray:
            if not candidates:
                return np.zeros(0)
            feats = np.stack([pool_features(f.numpy())
                              for f in self.search.extractor.extract_from(context, candidates)])
            return np.asarray(self.search.cost_model.predict(feats), dtype="float64")

    return _Adapter


_ADAPTER = None


def _MsCostModel(search):
    global _ADAPTER
    if _ADAPTER is None:
        _ADAPTER = _make_ms_cost_model()
    return _ADAPTER(search)
