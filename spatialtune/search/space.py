"""The design space of a workload for a target, and candidates drawn from it.

:class:`DesignSpace` holds MetaSchedule's ``post-order-apply`` design spaces of one workload for
one target (the sketches whose sampling decisions the search fills in), the feature extractor,
and turns schedules into :class:`Candidate` objects: what a builder needs (the scheduled module),
what the database stores (the trace, the features) and the kernel's identity (``mod_hash``).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..workloads.schedule import apply_trace, ensure_tensor_intrinsics, mod_hash, trace_to_json
from .cost_model import pool_features
from .tensorcore import tensor_core_generator, uses_tensor_cores

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    mod_hash: str
    trace: str  # tvm.ir.save_json of the MetaSchedule trace (replayed by workloads.schedule.apply_trace)
    mod_json: str  # tvm.ir.save_json of the scheduled module (what the builder compiles)
    features: np.ndarray | None
    source: str  # search | explore | transfer | best | default
    search_s: float = 0.0
    _ms: object = None  # the MetaSchedule MeasureCandidate it came from, if any


class Search(ABC):
    """Ask/tell contract: ``ask(n)`` returns at most n new candidates (an empty list means the
    space is exhausted), never one measured or proposed before; each must be passed back once
    through ``tell`` with its time in seconds (None for a failure) before the next ``ask``.
    ``measured`` holds the mod hashes of the kernels it was told of or started from, and
    ``close`` frees what the search holds (MetaSchedule's strategy state)."""

    measured: set[str]

    @abstractmethod
    def ask(self, n: int) -> list[Candidate]: ...

    @abstractmethod
    def tell(self, candidates: Sequence[Candidate], times: Sequence[float | None]) -> None: ...

    def close(self) -> None:
        pass


class DesignSpace:
    """MetaSchedule's design spaces of ``workload`` for ``target`` (a JSON-dict target)."""

    def __init__(self, workload, target: dict, *, rand_state: int = 0, threads: int = 1,
                 strategy=None, task_name: str | None = None, pack_panels: bool = True):
        import tvm
        from tvm.s_tir import meta_schedule as ms

        self.ms = ms
        self.workload = workload
        self.mod = workload.ir_module()
        self.target = tvm.target.Target(target)
        self.target_dict = dict(target)
        # The design space generator's rules name tensor intrinsics (VNNI on x86, MMA on CUDA)
        ensure_tensor_intrinsics(target)
        self.ctx = ms.TuneContext(mod=self.mod, target=self.target,
                                  space_generator=space_generator(self.mod, self.target, pack_panels),
                                  search_strategy=strategy, task_name=task_name or workload.key,
                                  rand_state=rand_state, num_threads=max(1, int(threads)))
        self.spaces = self.ctx.space_generator.generate_design_space(self.mod)
        self.extractor = ms.feature_extractor.PerStoreFeature()
        self.args_info = ms.arg_info.ArgInfo.from_prim_func(self.mod["main"])

    def features(self, schedules) -> np.ndarray:
        """Pooled per-store features, one row per schedule."""
        cands = [self.ms.MeasureCandidate(s, self.args_info) for s in schedules]
        if not cands:
            return np.zeros((0, 0), dtype=np.float32)
        return self.features_of(cands)

    def features_of(self, measure_candidates) -> np.ndarray:
        return np.stack([pool_features(f.numpy()) for f in self.extractor.extract_from(self.ctx, measure_candidates)])

    def candidate(self, sch, source: str, ms_cand=None, features: np.ndarray | None = None) -> Candidate:
        import tvm

        if features is None:
            features = self.features([sch])[0]
        return Candidate(mod_hash=mod_hash(sch.mod), trace=trace_to_json(sch.trace), mod_json=tvm.ir.save_json(sch.mod),
                         features=features, source=source, _ms=ms_cand)

    def apply(self, trace):
        """A schedule from a MetaSchedule trace whose decisions were changed (a mutation, a
        seed): replayed without its postprocessing, then through this space's postprocessors
        again. None when the replay or a postprocessor rejects it."""
        from tvm.s_tir import Schedule

        try:
            sch = Schedule(self.mod)
            trace.apply_to_schedule(sch, remove_postproc=True)
            sch.enter_postproc()
            if all(p.apply(sch) for p in self.ctx.space_generator.postprocs):
                return sch
        except Exception as e:
            log.debug("a changed trace does not apply to %s: %s", self.workload.key, e)
        return None

    def replay(self, trace: str):
        """A schedule from a stored trace, or None when it does not replay here."""
        try:
            return apply_trace(self.workload, trace)
        except Exception as e:  # a trace from another TVM version: not a candidate, not fatal
            log.debug("a stored trace does not replay on %s: %s", self.workload.key, e)
            return None


def space_generator(mod, target, pack_panels: bool = True):
    """MetaSchedule's post-order-apply generator with the target's own rules; for an fp16
    workload on a CUDA target of sm_80 or newer the tensor-core space of
    :mod:`~spatialtune.search.tensorcore` (both kinds of MMA kernel, which MetaSchedule's own
    rule list does not offer); on a CPU target, after the target's rules,
    :class:`~spatialtune.search.rules.PackPanels` (``pack_panels``),
    :class:`~spatialtune.search.rules.TransposeTiles`,
    :class:`~spatialtune.search.rules.BroadcastVectors` and
    :class:`~spatialtune.search.rules.RFactorVectors`."""
    from tvm.s_tir import meta_schedule as ms

    if uses_tensor_cores(mod, target):
        return tensor_core_generator(mod, target)
    if target.kind.name != "llvm":
        return "post-order-apply"
    from .rules import BroadcastVectors, PackPanels, RFactorVectors, TransposeTiles
    from .vector import vector_unit

    # The target's rules as MetaSchedule picks them (x86 ones with AVX-512 or VNNI, else llvm's)
    own = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply", task_name="rules")
    ours = [PackPanels()] if pack_panels else []
    # RFactorVectors first: it needs a block's loops as they come (MetaSchedule's compute-location
    # rule moves them), and marks what it scheduled for the rules after it to leave alone
    return ms.space_generator.PostOrderApply(sch_rules=[RFactorVectors(), *own.space_generator.sch_rules, *ours,
                                                        TransposeTiles(vector_unit(target).lanes(32)),
                                                        BroadcastVectors()])


def candidate_from_trace(workload, trace: str, source: str, features: np.ndarray | None = None,
                         expect_hash: str | None = None) -> Candidate | None:
    """A measured config as a candidate to build again: its trace replayed on the workload. None
    when it does not replay (a trace of another TVM version) or replays to another kernel than
    ``expect_hash``."""
    import tvm

    try:
        sch = apply_trace(workload, trace)
    except Exception as e:
        log.warning("%s: a stored config does not replay (%s); left out", workload.key, e)
        return None
    h = mod_hash(sch.mod)
    if expect_hash and h != expect_hash:
        log.warning("%s: config %s replays to %s; left out", workload.key, expect_hash, h)
        return None
    return Candidate(mod_hash=h, trace=trace, mod_json=tvm.ir.save_json(sch.mod), features=features, source=source)


def default_candidate(workload, target: dict) -> Candidate:
    """TVM's untuned default for ``target``: on a CPU the PrimFunc as ``tvm.compile`` takes it;
    on a GPU, where an unscheduled loop nest has no thread binding and cannot build, the
    ``DefaultGPUSchedule`` pass Relax's own pipeline falls back to (one thread per output
    element, no tiling)."""
    import tvm

    mod = workload.ir_module()
    if target.get("kind") == "cuda":
        import tvm.s_tir.transform

        with tvm.target.Target(target):
            mod = tvm.s_tir.transform.DefaultGPUSchedule()(mod)
    return Candidate(mod_hash=mod_hash(mod), trace="", mod_json=tvm.ir.save_json(mod), features=None,
                     source="default")


def stamp(cands: list[Candidate], t0: float) -> list[Candidate]:
    """Spread the search time since ``t0`` over the candidates it produced."""
    per = (time.perf_counter() - t0) / max(1, len(cands))
    for c in cands:
        c.search_s = per
    return cands
