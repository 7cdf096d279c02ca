"""The tensor-core design space of an fp16 workload on a CUDA target (sm_80 and newer).

The fp16 operators (:mod:`spatialtune.workloads.ops`) read float16, multiply and accumulate in
float32 and write float32: that is the ``f16f16f32`` form of TVM's tensor-core intrinsics (their
compute reads ``Cast(f32, A) * Cast(f32, B)`` into a float32 accumulator, and their store writes
the float32 fragment), so MetaSchedule's auto-tensorization matches the operators as they are.
An fp16 output would need a cast after the reduction that no intrinsic group stores, and the
``f16f16f16`` groups accumulate in fp16, which is not what the workloads promise.

MetaSchedule's ``cuda-tensorcore`` rule set has two tensor-core rules, one with the ``wmma``
intrinsic groups (``wmma.mma.sync`` in PTX) and one with the ``mma`` groups (``mma.sync``,
software-pipelined). In one rule list the first rule that matches a block takes it, so the
``mma`` rule never sees a GEMM that the ``wmma`` rule already tiled: the space here is the union
of two rule lists, each with one of them, so the search chooses between both kinds of kernel.
Both lists end with the plain CUDA rules, which schedule the blocks the intrinsics do not fit.

Building a ``wmma`` kernel needs :data:`spatialtune.cuda.tensorcore.TENSOR_CORE_PASS_CONFIG`.
"""

from __future__ import annotations

import logging

from ..cuda.tensorcore import TENSOR_CORE_MIN_SM, cuda_sm

KIND = "cuda-tensorcore"

log = logging.getLogger(__name__)

TC_RULES = ("wmma", "mma")
"""The tensor-core rules of the ``cuda-tensorcore`` set, in its order (TVM 0.27)."""


def reads_fp16(mod) -> bool:
    """Whether a PrimFunc of ``mod`` takes a float16 argument (an fp16 workload). In TVM 0.27 a
    PrimFunc's ``params`` are its buffers, typed with their element dtype."""
    return any(str(getattr(p, "dtype", "")) == "float16" for f in mod.functions.values()
               for p in getattr(f, "params", ()))


def uses_tensor_cores(mod, target) -> bool:
    """Whether the design space of ``mod`` on ``target`` (a ``tvm.target.Target``) is the
    tensor-core one: an fp16 workload on a CUDA target of sm_80 or newer."""
    return target.kind.name == "cuda" and (cuda_sm(target) or 0) >= TENSOR_CORE_MIN_SM and reads_fp16(mod)


def tensor_core_generator(mod, target):
    """The union of MetaSchedule's ``wmma`` and ``mma`` tensor-core spaces of ``mod`` on
    ``target`` (see the module doc). A rule list whose space generation fails on this module is
    left out with a log line (TVM 0.27's ``mma`` rule splits by a negative factor on some padded
    convolutions), so the workload keeps the other kind of kernel."""
    from tvm.s_tir import meta_schedule as ms

    def generator(k: int):
        # Fresh rule objects for each generator: a rule keeps the TuneContext it was initialised
        # with, and one shared by the probe below and the returned space generates nothing.
        rules = list(ms.ScheduleRule.create(KIND))
        tc = [i for i, r in enumerate(rules) if type(r).__name__ == "MultiLevelTilingTensorCore"]
        if k >= len(tc):
            return None
        return ms.space_generator.PostOrderApply(sch_rules=[r for j, r in enumerate(rules) if j not in tc or j == tc[k]],
                                                 postprocs=KIND, mutator_probs=KIND)

    gens = []
    for k in range(len(TC_RULES)):
        probe = generator(k)
        if probe is None:
            break
        try:
            ms.TuneContext(mod=mod, target=target, space_generator=probe, task_name="tensorcore").generate_design_space()
        except Exception as e:  # noqa: BLE001 - TVM raises its own ScheduleError/TVMError kinds
            log.info("the %s tensor-core rule is left out of this space: %s", TC_RULES[k],
                     str(e).strip().splitlines()[-1][:200])
            continue
        gens.append(generator(k))
    if not gens:  # neither kind of MMA kernel: the plain CUDA space
        return ms.space_generator.PostOrderApply(sch_rules="cuda", postprocs="cuda", mutator_probs="cuda")
    if len(gens) == 1:
        return gens[0]
    return ms.space_generator.SpaceGeneratorUnion(gens, sch_rules=KIND, postprocs=KIND, mutator_probs=KIND)
