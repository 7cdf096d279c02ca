"""Schedule rules spatialtune adds to MetaSchedule's own for a target.

:class:`PackPanels` (CPU targets): for a reduction whose operand is read along the reduction axis
but indexed by the output's innermost axis (a dense's weight ``W[N, K]``, the key in ``Q @ K^T``),
a second design space copies that operand into panels of ``width`` consecutive output columns,
``P[j // width, k, j % width]``, computed at a sampled loop (a panel per tile, or all of it
before the loops): the innermost vectorised loop then loads contiguous vectors instead of
gathering one element per column. It is what BLAS libraries do (pack B), inside the kernel, so
the kernel still takes the operator's own arrays and its time includes the copy. The unpacked
space stays, so the search can keep either.
"""

from __future__ import annotations

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
