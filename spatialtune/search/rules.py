"""Schedule rules spatialtune adds to MetaSchedule's own for a target.

:class:`PackPanels` (CPU targets): for a reduction whose operand is read along the reduction axis
but indexed by the output's innermost axis (a dense's weight ``W[N, K]``, the key in ``Q @ K^T``),
a second design space copies that operand into panels of ``width`` consecutive output columns,
``P[j // width, k, j % width]``, computed at a sampled loop (a panel per tile, or all of it
before the loops): the innermost vectorised loop then loads contiguous vectors instead of
gathering one element per column. It is what BLAS libraries do (pack B), inside the kernel, so
the kernel still takes the operator's own arrays and its time includes the copy. The unpacked
space stays, so the search can keep either.

:class:`TransposeTiles` (CPU targets): for a block that only copies one buffer into another with
the two buffers' innermost (contiguous) axes on different loops, a layout transform such as
``NCHW`` <-> ``NCHW16c``, two more design spaces that tile both loops and put the tiles innermost,
one tile vectorised and the other unrolled around it, so that a tile is read and written in
whole vectors and cache lines, as hand-written reorder kernels do. MetaSchedule's own space for
such a block only fuses, parallelises and vectorises its loops in their given order, which reads
or writes one element per cache line; in a model blocked by 16 channels its two transforms took
3-5x the time of ONNX Runtime's reorders.

:class:`BroadcastVectors` (CPU targets): for an element-wise block whose innermost axis is short
(a blocked layout's 8 or 16 channels) and that reads an operand broadcast along other axes but
indexed by the innermost one (a squeeze-and-excitation's per-channel scale, a bias), one more
design space vectorises the innermost axis alone and unrolls a sampled tile of the next axis around
it. MetaSchedule's own space fuses every loop and vectorises 64 elements of the fused loop, so the
broadcast operand is indexed modulo the channel block inside the vector, which LLVM turns into a
gather (docs/search.md has the measurements).

:class:`RFactorVectors` (CPU targets): for a sum (or max, ...) over outer axes that keeps a short
innermost axis (a global pooling in a blocked layout: ``[C/8, H, W, 8] -> [C/8, 8]``), one more
design space that splits the reduction into a sampled number of partial sums (``rfactor``), each a
vector of the kept axis held in registers, updated in turn (unrolled) so that the adds do not wait
on each other, the outer kept axes parallel. MetaSchedule's own rfactor spaces hold such kernels
among many slow ones, and a cost model trained on a model's convolutions did not rank them up.
"""

from __future__ import annotations

import math

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.schedule_rule import PyScheduleRule

PANEL_WIDTH = 16


def panel_operand(sch, block) -> tuple[int, int] | None:
    """(index in ``block``'s reads of the operand to pack, its dimension indexed by the output's
    innermost axis), or None."""
    from tvm import tirx

    b = sch.get(block)
    spatial = [iv.var for iv in b.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    reduce = {iv.var for iv in b.iter_vars if iv.iter_type == tirx.IterVar.CommReduce}
    if len(b.writes) != 1 or not spatial or not reduce:
        return None
    out = b.writes[0].region
    j = out[-1].min if out else None
    if not isinstance(j, tirx.Var) or j not in spatial:
        return None
    for i, r in enumerate(b.reads):
        mins = [rg.min for rg in r.region]
        if r.source.same_as(b.writes[0].source) or len(mins) < 2:
            continue
        last = mins[-1]
        jdim = next((d for d, m in enumerate(mins[:-1]) if m.same_as(j)), None)
        if isinstance(last, tirx.Var) and last in reduce and jdim is not None:
            if int(r.source.shape[jdim]) % PANEL_WIDTH == 0 and int(r.source.shape[jdim]) > PANEL_WIDTH:
                return i, jdim
    return None


@derived_object
class PackPanels(PyScheduleRule):
    def _initialize_with_tune_context(self, context) -> None:
        pass

    def apply(self, sch, block):
        found = panel_operand(sch, block)
        if found is None:
            return [sch]
        idx, jdim = found
        width = PANEL_WIDTH

        def index_map(*axes):
            head = [a // width if d == jdim else a for d, a in enumerate(axes)]
            return (*head, axes[jdim] % width)

        packed = sch.copy()
        panel = packed.cache_read(block, idx, "global")
        packed.transform_layout(panel, ("write", 0), index_map)
        packed.compute_at(panel, packed.sample_compute_location(panel))
        return [sch, packed]

    def clone(self):
        return PackPanels()


def axes_used(expr, axes) -> set[int]:
    """The positions in ``axes`` (a block's axis variables) of those ``expr`` uses."""
    from tvm.tirx.analysis import undefined_vars

    return {i for v in undefined_vars(expr) for i, a in enumerate(axes) if v.same_as(a)}


def drop_root_annotations(sch, *keys: str) -> None:
    """Take MetaSchedule's requests ``keys`` (``meta_schedule.parallel``, ``...vectorize``) off the
    root block, for a space that schedules those loops itself: the postprocessor would otherwise
    fuse and vectorise every loop again."""
    root = sch.get_sblock("root")
    for key in keys:
        if key in sch.get(root).annotations:
            sch.unannotate(root, key)


def transpose_loops(sch, block) -> tuple[int, int] | None:
    """(index of the loop that indexes the read's innermost dimension, index of the one that
    indexes the write's) among ``block``'s loops, for a block that stores one buffer's element
    into another buffer, every axis spatial, with each loop binding one block axis in order (as
    before any schedule) and those two loops different; else None."""
    from tvm import ir, tirx

    b = sch.get(block)
    loops = sch.get_loops(block)
    if (len(b.reads) != 1 or len(b.writes) != 1 or b.reads[0].source.same_as(b.writes[0].source)
            or len(loops) != len(b.iter_vars)
            or any(iv.iter_type != tirx.IterVar.DataPar for iv in b.iter_vars)):
        return None
    store = b.body
    if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, ir.TensorLoad):
        return None
    axes = [iv.var for iv in b.iter_vars]
    for lp, iv in zip(loops, b.iter_vars):
        loop = sch.get(lp)
        if not (isinstance(loop.extent, tirx.IntImm) and isinstance(iv.dom.extent, tirx.IntImm)
                and int(loop.extent) == int(iv.dom.extent)):
            return None

    def axis_of(index) -> int | None:
        used = axes_used(index, axes)
        return used.pop() if len(used) == 1 else None

    r, w = axis_of(store.value.indices[-1]), axis_of(store.indices[-1])
    if r is None or w is None or r == w or int(sch.get(loops[r]).extent) < 2 or int(sch.get(loops[w]).extent) < 2:
        return None
    return r, w


@derived_object
class TransposeTiles(PyScheduleRule):
    def __init__(self, lanes: int = 16) -> None:
        self.lanes = lanes

    def _initialize_with_tune_context(self, context) -> None:
        pass

    def apply(self, sch, block):
        found = transpose_loops(sch, block)
        if found is None:
            return [sch]
        out = [sch]
        for vector_side in (0, 1):  # the read's innermost axis in vectors, or the write's
            t = sch.copy()
            loops = t.get_loops(block)
            tiles = []
            for i in found:
                outer, inner = t.split(loops[i], t.sample_perfect_tile(loops[i], n=2, max_innermost_factor=self.lanes))
                tiles.append((outer, inner))
            rest = [lp for k, lp in enumerate(loops) if k not in found]
            vec, unr = tiles[vector_side][1], tiles[1 - vector_side][1]
            t.reorder(*rest, tiles[0][0], tiles[1][0], unr, vec)
            t.vectorize(vec)
            t.unroll(unr)
            out.append(t)
        return out

    def clone(self):
        return TransposeTiles(self.lanes)


def broadcast_inner(sch, block) -> bool:
    """Whether ``block`` stores an element-wise function of its reads (every axis spatial, a loop
    per axis in order) whose innermost axis, shorter than 64, indexes the last dimension of a read
    that some other axis of extent above one does not index (a broadcast operand)."""
    from tvm import tirx

    b = sch.get(block)
    loops = sch.get_loops(block)
    if (len(b.writes) != 1 or not b.reads or len(loops) != len(b.iter_vars) or len(loops) < 2
            or any(iv.iter_type != tirx.IterVar.DataPar or not isinstance(iv.dom.extent, tirx.IntImm)
                   for iv in b.iter_vars)):
        return False
    axes = [iv.var for iv in b.iter_vars]
    extents = [int(iv.dom.extent) for iv in b.iter_vars]
    if not 1 < extents[-1] < 64 or any(int(sch.get(lp).extent) != e for lp, e in zip(loops, extents)):
        return False
    for r in b.reads:
        if r.source.same_as(b.writes[0].source) or not r.region:
            continue
        used = set().union(*(axes_used(rg.min, axes) for rg in r.region))
        if axes_used(r.region[-1].min, axes) == {len(axes) - 1} and any(i not in used and extents[i] > 1 for i in range(len(axes) - 1)):
            return True
    return False


@derived_object
class BroadcastVectors(PyScheduleRule):
    def _initialize_with_tune_context(self, context) -> None:
        pass

    def apply(self, sch, block):
        if not broadcast_inner(sch, block):
            return [sch]
        t = sch.copy()
        drop_root_annotations(t, "meta_schedule.vectorize")  # the parallel outer loops it may still fuse
        loops = t.get_loops(block)
        # the nearest loop outside the innermost that has more than one iteration
        outer = next((lp for lp in reversed(loops[:-1]) if int(t.get(lp).extent) > 1), None)
        if outer is not None:
            _, unr = t.split(outer, t.sample_perfect_tile(outer, n=2, max_innermost_factor=16))
            t.unroll(unr)
        t.vectorize(loops[-1])
        return [sch, t]

    def clone(self):
        return BroadcastVectors()


def kept_inner_reduction(sch, block) -> int | None:
    """The number of spatial axes of ``block`` if it reduces one input over axes that index
    dimensions before its last, keeping a short innermost axis (2 to 63) that indexes the last
    (loops as the block's axes, in order, spatial ones first; no producer block, at least two
    outer kept iterations); else None."""
    from tvm import tirx

    b = sch.get(block)
    loops = sch.get_loops(block)
    kinds = [iv.iter_type for iv in b.iter_vars]
    n_sp = kinds.count(tirx.IterVar.DataPar)
    if (len(b.writes) != 1 or len(loops) != len(b.iter_vars) or n_sp < 2 or n_sp == len(kinds)
            or kinds != sorted(kinds, key=lambda k: k != tirx.IterVar.DataPar) or sch.get_producers(block)
            or any(not isinstance(iv.dom.extent, tirx.IntImm) for iv in b.iter_vars)
            or any(int(sch.get(lp).extent) != int(iv.dom.extent) for lp, iv in zip(loops, b.iter_vars))):
        return None
    axes = [iv.var for iv in b.iter_vars]
    extents = [int(iv.dom.extent) for iv in b.iter_vars]
    reads = [r for r in b.reads if not r.source.same_as(b.writes[0].source)]
    if not 1 < extents[n_sp - 1] < 64 or len(reads) != 1 or not reads[0].region or math.prod(extents[: n_sp - 1]) < 2:
        return None

    region = reads[0].region
    if axes_used(region[-1].min, axes) != {n_sp - 1} or axes_used(b.writes[0].region[-1].min, axes) != {n_sp - 1}:
        return None
    if not all(any(i in axes_used(rg.min, axes) for rg in region[:-1]) for i in range(n_sp, len(axes))):
        return None
    return n_sp


@derived_object
class RFactorVectors(PyScheduleRule):
    def _initialize_with_tune_context(self, context) -> None:
        pass

    def apply(self, sch, block):
        n_sp = kept_inner_reduction(sch, block)
        if n_sp is None:
            return [sch]
        t = sch.copy()
        drop_root_annotations(t, "meta_schedule.parallel", "meta_schedule.vectorize")
        loops = t.get_loops(block)
        red = loops[n_sp:]
        r = t.fuse(*red) if len(red) > 1 else red[0]
        _, inner = t.split(r, t.sample_perfect_tile(r, n=2, max_innermost_factor=16))
        rf = t.rfactor(inner, factor_axis=0)  # partial sums rf[f, ...]; ``block`` now adds them up
        kept = t.get_loops(block)[: n_sp - 1]
        outer = t.fuse(*kept) if len(kept) > 1 else kept[0]
        t.parallel(outer)
        t.compute_at(rf, outer, preserve_unit_loops=True)  # as many loops whatever the factor: replayable
        t.set_scope(rf, 0, "local")
        # the partial sums' loops inside ``outer``: the factor, the kept inner axis, the rest of the reduction
        rl = t.get_loops(rf)
        t.reorder(rl[-1], rl[1], rl[-2])
        rl = t.get_loops(rf)
        t.vectorize(rl[-1])
        t.unroll(rl[-2])
        for b in (rf, block):  # MetaSchedule's rules, which come after this one, leave them as they are
            t.annotate(b, "schedule_rule", "None")
        return [sch, t]

    def clone(self):
        return RFactorVectors()
