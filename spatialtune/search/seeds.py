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

from dataclasses import dataclass

import numpy as np

from ..workloads.schedule import mod_hash
from .rules import PANEL_WIDTH
from .space import Candidate

SPATIAL_LEVELS = 4  # SSRSRS: a spatial loop is split in four, a reduction loop in two
REDUCTION_LEVELS = 2
INNER_REDUCTION = (16, 64)  # the inner reduction tile: the longest divisor in this range


@dataclass(frozen=True)
class VectorUnit:
    bits: int  # vector register width
    registers: int  # vector registers

    def lanes(self, dtype_bits: int) -> int:
        return max(1, self.bits // dtype_bits)


def vector_unit(target) -> VectorUnit | None:
    """The vector unit of an LLVM target (None for other targets)."""
    import tvm
    from tvm.target import codegen

    t = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if t.kind.name != "llvm":
        return None
    try:
        if codegen.llvm_cpu_has_features("avx512f", t):
            return VectorUnit(512, 32)
        if codegen.llvm_cpu_has_features("avx", t):
            return VectorUnit(256, 16)
        if codegen.llvm_cpu_has_features("neon", t):
            return VectorUnit(128, 32)
    except Exception:  # an LLVM without that query: assume SSE
        pass
    return VectorUnit(128, 16)


def register_tiles(unit: VectorUnit, dtype_bits: int, cols: int, rows: int) -> list[tuple[int, int]]:
    """(mr, nr) register tiles for an output of ``rows`` x ``cols`` (its innermost spatial axis
    and the one before): ``nr`` a multiple of the vector lanes dividing ``cols``, ``mr``
    dividing ``rows``, with between half and all of the registers left after the loads (four)
    holding accumulators."""
    lanes = unit.lanes(dtype_bits)
    budget = unit.registers - 4
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
    return out


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


def seed_decisions(trace, unit: VectorUnit, dtype_bits: int, rng) -> dict | None:
    """New decisions for ``trace`` (instruction -> decision) giving its tiled block a register
    tile, or None when the trace has no single SSRSRS block to shape or no tile fits."""
    spatial, reduction = _tile_insts(trace)
    if len(spatial) < 2 or not reduction:
        return None
    ext = {inst: int(np.prod([int(x) for x in trace.decisions[inst]])) for inst in spatial + reduction}
    cols_i, rows_i = spatial[-1], spatial[-2]
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
    out, taken = [], set(exclude)
    for c in samples:
        if len(out) >= n:
            break
        drawn = c._ms.sch if c._ms is not None else space.replay(c.trace)
        if drawn is None:
            continue
        trace = drawn.trace
        dec = seed_decisions(trace, unit, dtype_bits, rng)
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
