"""Software prefetch of a tiled reduction's next block, spread over the loops that reuse a block.

A CPU kernel that MetaSchedule tiles for a reduction (its multi-level tiling, ``SSRSRS``) runs an
outer reduction loop ``ko`` over blocks of the reduction axis; inside one block, spatial loops
that the streamed operand (a matmul's weights) does not depend on reuse the block while the
innermost reduction loop ``ki`` feeds the register tile. Each block of that operand is read from
memory on the first pass of the reuse loops: it comes in strided rows (a row of the tile, then
the next row a whole matrix row further on), which the hardware prefetchers barely follow, so
the core waits for it. Inside a model the layers between two calls of a task have evicted its
weights, so every block waits so, and the BERT layer's matmuls lost a large part of their time to
it against the same kernels timed warm (docs/models.md, *Weights prefetched a block ahead*);
ONNX Runtime's MLAS kernels prefetch ahead in their packed weights.

:func:`rewrite` puts, just before each innermost reduction loop, prefetches of the rows of the
*next* outer block that this iteration of the reuse loops is responsible for: the block's
``ki`` rows divided evenly over the reuse iterations, one prefetch per cache line of the
register tile's columns. So the next block arrives while the current one is computed, no
prefetch is issued twice for a line, and the hot loop stays as it was. (A prefetch *inside* the
innermost loop costs more than it gives: LLVM's ``llvm.prefetch`` may read its argument's memory
and carries no alias metadata, so the register tile's accumulators were stored back to memory
on every iteration, and the kernel ran at half speed.) Indices are clamped to the buffer, so the
last block prefetches its own rows rather than addresses past the end.

What qualifies: an operand read by the block that the function does not allocate and the block
does not write (an accumulator is in the caches already), whose last index varies with a
vectorised loop inside ``ki``. A function with no split reduction, or with
symbolic extents, is left unchanged; a site that would need more than :data:`CAP` prefetches is
skipped. A prefetch does not change any value, so no output check is needed for it; what it
changes is time, and it applies, like :mod:`.fastmath`, to the *scheduled* module just before
``tvm.compile`` everywhere a CPU kernel is built (the tuner's builder, a model's compile, the
cold re-ranking, a looked-up kernel), so what is timed is what is deployed. The keys and hashes
stay those of the scheduled module. ``SPATIALTUNE_PREFETCH=0`` in the environment turns it off
(for an A/B run of the same records).
"""

from __future__ import annotations

import itertools
import math
import os

CAP = 64
"""Most prefetches placed before one innermost reduction loop."""

LINE = 64
"""Cache line bytes: one prefetch per line of the register tile's row."""

LOCALITY = 3
"""``llvm.prefetch``'s locality (3: all cache levels, ``prefetcht0`` on x86); 2 and 1 (L2 and
below) timed the same, 0 (non-temporal) slower than no prefetch (docs/models.md)."""


def enabled() -> bool:
    return os.environ.get("SPATIALTUNE_PREFETCH", "1") not in ("0", "off", "no", "false")


def _vars(expr) -> list:
    import tvm_ffi
    from tvm import tirx

    out = []
    tvm_ffi.structural_map(expr, ((tirx.Var, lambda v: out.append(v) or v),))
    return out


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in _vars(expr))


def _subst(expr, pairs):
    import tvm_ffi
    from tvm import tirx

    return tvm_ffi.structural_map(expr, ((tirx.Var, lambda v: next((x for k, x in pairs if k.same_as(v)), v)),))


def _const(value: int, like):
    from tvm import tirx

    return tirx.const(value, str(like.ty.dtype))


def _extent(loop) -> int | None:
    from tvm import tirx

    return int(loop.extent.value) if isinstance(loop.extent, tirx.IntImm) else None


class _Planner:
    """Where to prefetch in one PrimFunc: [(loop var of an innermost reduction loop, statements)]."""

    def __init__(self, func):
        import tvm_ffi
        from tvm import s_tir

        self.allocs: set[str] = set()
        tvm_ffi.structural_map(func.body, ((s_tir.SBlock, self._alloc),))
        self.sites: list[tuple[object, list]] = []
        self._walk(func.body, [])

    def _alloc(self, block):
        self.allocs.update(b.name for b in block.alloc_buffers)
        return block

    def _walk(self, s, stack: list) -> None:
        from tvm import s_tir, tirx

        if isinstance(s, tirx.For):
            self._site(s, stack)
            self._walk(s.body, stack + [s])
        elif isinstance(s, tirx.SeqStmt):
            for x in s:
                self._walk(x, stack)
        elif isinstance(s, s_tir.SBlockRealize):
            self._walk(s.block.body, stack)
        elif getattr(s, "body", None) is not None:
            self._walk(s.body, stack)

    def _site(self, ki, stack: list) -> None:
        import tvm
        import tvm_ffi
        from tvm import s_tir, tirx

        inner, leaf = [], ki.body
        while isinstance(leaf, tirx.For):
            inner.append(leaf)
            leaf = leaf.body
        if ki.kind != tirx.ForKind.SERIAL or not isinstance(leaf, s_tir.SBlockRealize):
            return
        block = leaf.block
        red = [b for iv, b in zip(block.iter_vars, leaf.iter_values) if iv.iter_type == tirx.IterVar.CommReduce]
        if not any(_uses(b, ki.loop_var) for b in red) or any(_uses(b, x.loop_var) for b in red for x in inner):
            return  # not a reduction loop, or not the innermost one
        outer = [i for i, x in enumerate(stack) if any(_uses(b, x.loop_var) for b in red)]
        loops = [ki, *inner, *stack]
        if not outer or any(_extent(x) is None for x in loops):
            return
        ko, between = stack[outer[-1]], stack[outer[-1] + 1:]
        bind = [(iv.var, b) for iv, b in zip(block.iter_vars, leaf.iter_values)]
        loads = []
        tvm_ffi.structural_map(block.body, ((tvm.ir.TensorLoad, lambda x: loads.append(x) or x),))
        stmts, seen = [], {r.source.name for r in block.writes}  # the accumulator is in the caches
        for ld in loads:
            if ld.source.name in self.allocs or ld.source.name in seen:
                continue
            seen.add(ld.source.name)
            stmts += self._prefetches(ld, [_subst(i, bind) for i in ld.indices], ko, ki, inner, between)
        if stmts:
            self.sites.append((ki.loop_var, stmts))

    def _prefetches(self, ld, idx, ko, ki, inner, between) -> list:
        import tvm
        from tvm import tirx

        vec = [x for x in inner if x.kind == tirx.ForKind.VECTORIZED and _uses(idx[-1], x.loop_var)]
        if not vec:
            return []  # not read a vector at a time along the loops inside ki: nothing streamed
        lanes = vec[0]
        used = [x for x in inner if x.kind != tirx.ForKind.VECTORIZED and any(_uses(i, x.loop_var) for i in idx)]
        reuse = [x for x in between if _extent(x) > 1 and not any(_uses(i, x.loop_var) for i in idx)]
        which = _const(0, ki.extent)  # this iteration's place among the reuse loops' iterations
        for x in reuse:
            which = which * _extent(x) + x.loop_var
        rows = -(-_extent(ki) // math.prod(_extent(x) for x in reuse))
        step = max(1, LINE // (tvm.runtime.DataType(str(ld.source.dtype)).bits // 8))
        offsets = range(0, _extent(lanes), step)
        if rows * math.prod(_extent(x) for x in used) * len(offsets) > CAP:
            return []
        shape = list(ld.source.shape)
        nxt = tirx.min(ko.loop_var + 1, _const(_extent(ko) - 1, ko.extent))
        out = []
        for t in range(rows):
            for combo in itertools.product(*[range(_extent(x)) for x in used]):
                for off in offsets:
                    pairs = [(ko.loop_var, nxt), (ki.loop_var, which * rows + t), (lanes.loop_var, _const(off, lanes.extent))]
                    pairs += [(x.loop_var, _const(c, x.extent)) for x, c in zip(used, combo)]
                    pairs += [(x.loop_var, _const(0, x.extent)) for x in inner if x not in used and not x.same_as(lanes)]
                    at = [tirx.min(_subst(i, pairs), n - 1) for i, n in zip(idx, shape)]
                    addr = tirx.address_of(tirx.BufferLoad(ld.source, at))
                    out.append(tirx.Evaluate(tirx.call_intrin("void", "tirx.prefetch", addr, 0, LOCALITY, 1)))
        return out


def rewrite(mod, skip=None):
    """(``mod`` with the prefetches placed in each scheduled PrimFunc, prefetch statements
    placed). Functions for which ``skip(name, func)`` is true are left as they are, and so is
    every function when :func:`enabled` is false."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    out, total = tvm.IRModule(dict(mod.functions), attrs=mod.attrs), 0
    if not enabled():
        return out, 0
    for gv, f in mod.functions.items():
        if not isinstance(f, tirx.PrimFunc) or (skip is not None and skip(gv.name_hint, f)):
            continue
        sites = _Planner(f).sites
        if not sites:
            continue

        def visit(loop, sites=sites):
            found = next((s for v, s in sites if loop.loop_var.same_as(v)), None)
            return loop if found is None else tirx.SeqStmt([*found, loop])

        out[gv] = f.with_body(tvm_ffi.structural_map(f.body, ((tirx.For, visit),)))
        total += sum(len(s) for _, s in sites)
    return out, total


def before_compile(mod, target: dict, fast_math: bool = False):
    """What a scheduled kernel module gets before ``tvm.compile`` on a CPU (``target`` kind llvm):
    fast math where its task uses it (:mod:`.fastmath`), then the prefetches. Every path that
    builds a tuned CPU kernel goes through here, so all build what the tuner timed; another
    target gets ``mod`` back as it is."""
    if target.get("kind") != "llvm":
        return mod
    if fast_math:
        from .fastmath import rewrite as fast

        mod = fast(mod)[0]
    return rewrite(mod)[0]
