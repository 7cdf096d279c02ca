"""Register-tile seeds: CPU candidates whose innermost tiles have the shape of a BLAS microkernel.

A multi-level tiled reduction (MetaSchedule's ``SSRSRS``) runs its innermost spatial tiles as a
block of accumulators per step of the inner reduction loop. BLAS kernels size that block to the
register file: ``nr`` output columns as a few whole vectors times ``mr`` rows, so that one
broadcast of the left operand and ``nr / lanes`` vector loads of the right one feed ``mr * nr /
lanes`` independent FMAs, enough to cover the FMA latency and few enough to stay in registers.
MetaSchedule's tile sampling (each prime factor to a random level) gives one to about one
sample in 25 of a 128 x 2304 x 768 dense, and also an inner reduction of 48 or 64 to one in 100;
a model that has not seen such a kernel does not rank it high.

:func:`register_tile_seeds` takes uniform samples of the design space and gives them such an
innermost tile (from the target's vector width and register count, never from the workload's
name) and the loop order around it that GotoBLAS uses: a long inner reduction, a column tile a
few register tiles wide with (in half of them) every row inside it, a packed operand copied once
per column tile, a deep unroll; the outer tile levels are drawn again and every other decision
stays as sampled. They are measured like any other candidate, in a share's first batches, and
the evolution takes the fast ones as parents.
"""

from __future__ import annotations

import numpy as np

from ..workloads.prim import blocks
from ..workloads.schedule import mod_hash
from .rules import PANEL_WIDTH
from .space import Candidate
from .vector import VectorUnit, vector_unit

SPATIAL_LEVELS = 4  # SSRSRS: a spatial loop is split in four, a reduction loop in two
REDUCTION_LEVELS = 2
INNER_REDUCTION = (16, 64)  # the inner reduction tile: the longest divisor in this range


def register_tiles(unit: VectorUnit, dtype_bits: int, cols: int, rows: int) -> list[tuple[int, int]]:
    """(mr, nr) register tiles for an output of ``rows`` x ``cols`` (its innermost spatial axis
    and the axis the broadcast operand runs along): ``nr`` a multiple of the vector lanes dividing
    ``cols``, ``mr`` dividing ``rows``, with between half and all of the registers left after the
    loads (four) holding accumulators.

    Where no multiple of a whole register divides ``cols`` (a convolution's output row of 56 or
    28 pixels against 16 fp32 lanes), the tile uses the widest half or quarter register that does,
    down to 128 bits: a tail loop or a masked vector per row would cost more than the narrower
    vector, and an AVX-512 core runs 256-bit FMAs at the same rate on AMD and at half on Intel."""
    budget = unit.registers - 4
    for bits in (unit.bits, unit.bits // 2, unit.bits // 4):
        if bits < 128:
            break
        lanes = max(1, bits // dtype_bits)
        out = []
        for nv in range(1, 5):
            nr = nv * lanes
            if cols % nr:
                continue
            for mr in range(1, rows + 1):
                acc = mr * nv
                if acc > budget:
                    break
                if rows % mr == 0 and acc * 2 >= budget:
                    out.append((mr, nr))
        if out:
            return out
    return []


def broadcast_axis(mod) -> int | None:
    """Which spatial axis of ``mod``'s one tiled reduction block the register tile's rows run
    along: the last one, before the innermost, that no operand read with the innermost axis is
    indexed by. For a matmul ``C[i, j] += A[i, k] * B[k, j]`` that is ``i`` (``B``'s vector is
    reused across rows of ``A`` broadcast); for an NCHW convolution ``out[n, f, y, x] +=
    in[n, c, y + r, x + s] * w[f, c, r, s]`` it is ``f``, not ``y``: one input vector feeds an
    FMA per output channel, a weight broadcast each. None without exactly one such block."""
    from tvm import tirx
    from tvm.s_tir import Schedule
    from tvm.tirx.analysis import undefined_vars

    found = []
    for blk in blocks(Schedule(mod)):
        spatial = [iv.var for iv in blk.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
        if len(blk.writes) != 1 or len(spatial) < 2 or len(spatial) == len(blk.iter_vars):
            continue
        cols = blk.writes[0].region[-1].min if blk.writes[0].region else None
        if isinstance(cols, tirx.Var) and cols.same_as(spatial[-1]):
            found.append((blk, spatial))
    if len(found) != 1:
        return None
    blk, spatial = found[0]
    used: set = set()
    for r in blk.reads:
        if r.source.same_as(blk.writes[0].source):
            continue
        names = [set(undefined_vars(rg.min)) for rg in r.region]
        vars_ = {v for vs in names for v in vs}
        if any(v.same_as(spatial[-1]) for v in vars_):
            used |= {id(v) for v in spatial if any(v.same_as(u) for u in vars_)}
    free = [i for i, v in enumerate(spatial[:-1]) if id(v) not in used]
    return free[-1] if free else None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _split(n: int, parts: int, rng) -> list[int]:
    """A random perfect split of ``n`` into ``parts`` factors (each a divisor of what is left)."""
    out = []
    for _ in range(parts - 1):
        f = int(rng.choice(_divisors(n)))
        out.append(f)
        n //= f
    return [*out, n]


def _tile_insts(trace) -> tuple[list, list]:
    spatial, reduction = [], []
    for inst in trace.insts:
        if inst.kind.name == "SamplePerfectTile" and inst in trace.decisions:
            n = len(trace.decisions[inst])
            (spatial if n == SPATIAL_LEVELS else reduction if n == REDUCTION_LEVELS else []).append(inst)
    return spatial, reduction


def seed_decisions(trace, unit: VectorUnit, dtype_bits: int, rng, rows_at: int | None = None) -> dict | None:
    """New decisions for ``trace`` (instruction -> decision) giving its tiled block a register
    tile, or None when the trace has no single SSRSRS block to shape or no tile fits.
    ``rows_at``: the spatial axis the tile's rows run along (:func:`broadcast_axis`; default the
    one before the innermost)."""
    spatial, reduction = _tile_insts(trace)
    if len(spatial) < 2 or not reduction:
        return None
    ext = {inst: int(np.prod([int(x) for x in trace.decisions[inst]])) for inst in spatial + reduction}
    at = rows_at if rows_at is not None and rows_at < len(spatial) - 1 else len(spatial) - 2
    cols_i, rows_i = spatial[-1], spatial[at]
    # whole panels of a packed operand per tile (rules.PackPanels), or whole tiles per panel
    tiles = [(mr, nr) for mr, nr in register_tiles(unit, dtype_bits, ext[cols_i], ext[rows_i])
             if nr % PANEL_WIDTH == 0 or PANEL_WIDTH % nr == 0]
    if not tiles:
        return None
    mr, nr = tiles[int(rng.integers(len(tiles)))]
    out = {}
    for inst in spatial:
        if inst is cols_i:  # a few register tiles wide, so a tile's packed panel stays in cache
            c = int(rng.choice([d for d in _divisors(ext[inst] // nr) if d <= 4]))
            out[inst] = [*_split(ext[inst] // (nr * c), 2, rng), c, nr]
        elif inst is rows_i and rng.random() < 0.5:  # every row inside a column tile (GotoBLAS's order)
            out[inst] = [1, 1, ext[inst] // mr, mr]
        elif inst is rows_i:
            out[inst] = [*_split(ext[inst] // mr, 3, rng), mr]
        else:  # batch-like axes: outside the tile, where the parallel loop is
            out[inst] = [*_split(ext[inst], 2, rng), 1, 1]
    ns = len(spatial)
    # The sampled compute locations (on a CPU target the packed operand's, rules.PackPanels): under
    # the column tile's outer loop or the reduction's outer loop, so a panel is copied once per
    # column tile (whole or a block of the reduction at a time), not once per row tile or all of
    # it before the loops. Loops are numbered as the tiling orders them (the spatial axes' levels
    # 0 and 1, then the reduction's level 0); a location that does not exist fails the replay.
    for inst in trace.insts:
        if inst.kind.name == "SampleComputeLocation" and inst in trace.decisions:
            out[inst] = 2 * ns - 1 + int(rng.integers(2))
    k_i = max(reduction, key=lambda i: ext[i])
    ks = [d for d in _divisors(ext[k_i]) if INNER_REDUCTION[0] <= d <= INNER_REDUCTION[1]]
    if ks:
        k1 = int(rng.choice(ks[-2:]))  # long: the accumulators stay in registers across it
        out[k_i] = [ext[k_i] // k1, k1]
    for inst in reduction:  # a convolution's window: whole inside, or the tile is stored per tap
        if inst is not k_i and ext[inst] <= 16:
            out[inst] = [1, ext[inst]]
    for inst in trace.insts:  # the unroll depth: one of the two deepest, so the tile unrolls
        if inst.kind.name == "SampleCategorical" and inst in trace.decisions:
            cands = [int(c) for c in inst.attrs[0]]
            if cands and max(cands) >= 64:
                deep = sorted(range(len(cands)), key=lambda i: cands[i])[-2:]
                out[inst] = int(rng.choice(deep))
    return out


def register_tile_seeds(space, samples, n: int, rng, exclude=frozenset()) -> list[Candidate]:
    """Up to ``n`` candidates: ``samples`` (uniform candidates of ``space``, with their
    MetaSchedule schedules) with register-tile decisions (:func:`seed_decisions`)."""
    import tvm

    unit = vector_unit(space.target)
    if unit is None or n <= 0:
        return []
    dtype_bits = tvm.DataType(str(space.args_info[-1].dtype)).bits  # the output's
    try:
        rows_at = broadcast_axis(space.mod)
    except Exception:  # a block structure the analysis does not know: the default rows
        rows_at = None
    out, taken = [], set(exclude)
    for c in samples:
        if len(out) >= n:
            break
        drawn = c._ms.sch if c._ms is not None else space.replay(c.trace)
        if drawn is None:
            continue
        trace = drawn.trace
        dec = seed_decisions(trace, unit, dtype_bits, rng, rows_at)
        if dec is None:
            continue
        for inst, d in dec.items():
            trace = trace.with_decision(inst, d, remove_postproc=True)
        sch = space.apply(trace)
        if sch is None:  # a decision the replay or the postprocessors reject
            continue
        h = mod_hash(sch.mod)
        if h in taken:
            continue
        taken.add(h)
        out.append(space.candidate(sch, "seed-tile"))
    return out
