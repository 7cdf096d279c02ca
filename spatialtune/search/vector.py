"""The vector unit of a CPU target: what register tiles (:mod:`.seeds`) and tiled transposes
(:class:`.rules.TransposeTiles`) are sized by. Its own module because the design space
(:mod:`.space`) and the seeds, which take candidates from it, both need it."""

from __future__ import annotations

from dataclasses import dataclass


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
