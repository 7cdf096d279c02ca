"""Sibling tasks: kernels of one model task tried on another with the same main computation.

A model has tasks that compute the same thing on other shapes or with other epilogues: the QKV,
output and MLP projections of a transformer layer, the 1x1 and 3x3 convolutions of a CNN stage
(a 1x1 convolution is a 3x3 one with a window of one). The best tiling of one is a good first
guess for the others, far better than a uniform sample, so a task's first batch at a share
measures its siblings' best kernels at that share (:meth:`~.policy.SharePolicy.transfers`).

Siblings are found from the IR, never from names or shapes: two tasks are siblings when their
one tiled reduction block has the same form (:func:`signature`: which iteration axes index each
dimension of each operand, and the dtypes). A sibling's kernel is its MetaSchedule trace replayed
on this task (:func:`adapt`) with every tile split refitted to this task's loop extents
(:func:`refit`): the innermost factors (the register tile) are kept where they divide, the rest
moves outwards. A trace that names a block this task lacks (another epilogue) or a location
that does not exist here does not replay, and is skipped.
"""

from __future__ import annotations

import logging

from ..workloads.prim import blocks

log = logging.getLogger(__name__)


def _main_block(mod):
    """The one block of ``mod`` with both spatial and reduction axes, or None."""
    from tvm import tirx
    from tvm.s_tir import Schedule

    found = [blk for blk in blocks(Schedule(mod)) if len(blk.writes) == 1
             and {tirx.IterVar.DataPar, tirx.IterVar.CommReduce} <= {iv.iter_type for iv in blk.iter_vars}]
    return found[0] if len(found) == 1 else None


def signature(mod) -> tuple | None:
    """The form of ``mod``'s main computation: per operand, the dtype and for each dimension the
    positions of the block axes its index uses; None without exactly one tiled reduction block."""
    from tvm.tirx.analysis import undefined_vars

    blk = _main_block(mod)
    if blk is None:
        return None
    axes = [iv.var for iv in blk.iter_vars]
    kinds = tuple(int(iv.iter_type) for iv in blk.iter_vars)

    def form(region) -> tuple:
        out = []
        for rg in region.region:
            used = undefined_vars(rg.min)
            out.append(tuple(i for i, a in enumerate(axes) if any(a.same_as(u) for u in used)))
        return (str(region.source.dtype), tuple(out))

    reads = tuple(sorted(form(r) for r in blk.reads if not r.source.same_as(blk.writes[0].source)))
    # the extents of the reduction axes besides the longest (a convolution's window): a 3x3
    # kernel's tiling says little about a 1x1's, whose whole reduction is the channels
    red = sorted((int(iv.dom.extent) for iv in blk.iter_vars if int(iv.iter_type) == 2), reverse=True)
    return kinds, form(blk.writes[0]), reads, tuple(red[1:])


def signature_or_none(workload) -> tuple | None:
    """:func:`signature` of a workload's module; None where the analysis does not apply."""
    try:
        return signature(workload.ir_module())
    except Exception as e:  # a block form the analysis does not know: the task has no siblings
        log.debug("no signature for %s: %s", workload.key, e)
        return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def refit(factors: list[int], extent: int) -> list[int]:
    """A perfect split of ``extent`` into ``len(factors)`` levels shaped like ``factors``: from the
    innermost level out, each keeps its factor if it divides what is left, else takes the largest
    divisor below it; the outermost level takes the rest."""
    left, inner = extent, []
    for f in reversed(factors[1:]):
        g = max(d for d in _divisors(left) if d <= max(1, f))
        inner.append(g)
        left //= g
    return [left, *reversed(inner)]


def _prune(trace, names: set[str]):
    """``trace`` without the instructions on blocks ``names`` lacks (an epilogue this task does
    not have) and everything that depends on them."""
    from tvm.s_tir import Trace
    from tvm.s_tir.schedule import ExprRV, LoopRV, SBlockRV

    rvs = (SBlockRV, LoopRV, ExprRV)
    defined, kept = set(), []
    for inst in trace.insts:
        if inst.kind.name == "GetSBlock" and str(inst.attrs[0]) not in names:
            continue
        if any(isinstance(x, rvs) and x not in defined for x in inst.inputs):
            continue
        kept.append(inst)
        defined.update(inst.outputs)
    return Trace(kept, {i: d for i, d in trace.decisions.items() if any(i.same_as(k) for k in kept)})


def adapt(space, donor_workload, trace_json: str):
    """A schedule of ``space``'s workload from a trace of ``donor_workload`` (tile splits refitted,
    postprocessed by ``space``'s own postprocessors), or None when it does not replay here."""
    from tvm.s_tir import Schedule

    from ..workloads.schedule import apply_trace

    try:
        sch = Schedule(space.mod)
        donor = _prune(apply_trace(donor_workload, trace_json).trace, {b.name_hint for b in blocks(sch)})

        def provide(inst, inputs, attrs, decision):
            if inst.kind.name == "SamplePerfectTile" and decision is not None:
                return refit([int(x) for x in decision], int(sch.get(inputs[0]).extent))
            return decision

        donor.apply_to_schedule(sch, remove_postproc=True, decision_provider=provide)
        sch.enter_postproc()
        if all(p.apply(sch) for p in space.ctx.space_generator.postprocs):
            return sch
    except Exception as e:  # another epilogue, a location that does not exist here: not a sibling kernel
        log.debug("a trace of %s does not replay on %s: %s", donor_workload.key, space.workload.key,
                  str(e).strip().splitlines()[-1:] or e)
    return None
