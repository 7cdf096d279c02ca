"""Winograd convolutions: a 3x3 stride-1 convolution as three tasks with fewer multiplications.

A direct 3x3 convolution already runs at about the FMA peak of a core (both here and in ONNX
Runtime's MLAS), so a model whose time is in such convolutions can only get faster by doing fewer
multiplications. Winograd's F(m x m, 3 x 3) computes each m x m output tile from an (m+2) x (m+2)
input tile with (m+2)^2 multiplications per channel pair instead of 9 m^2 (F(4x4, 3x3): 36 against
144). :func:`winograd_nchwc` writes the convolution as

1. the input transform ``V = B^T d B`` of every tile (a task, :func:`input_transform`),
2. one matrix multiplication per point of the transformed tile, ``M[a] = V[a] U[a]`` over input
   channels (a batch matmul task, which the search tiles like any other), with ``U = G g G^T``
   the transformed weights (computed from the constant weights once, at compile time),
3. the output transform ``Y = A^T M A`` (a task; the convolution's epilogue, bias, ReLU, residual,
   fuses into it as into the direct kernel).

Both transforms are TIR written as straight-line code per tile and channel block, the matrices'
entries as literals and their zeros left out, in vectors along the channel block (the vector
axis of ``NCHW{b}c``), their loops fixed; the output transform carries an ``op_pattern`` so that
the epilogue fuses after it. Every task is ordinary arithmetic, checked against its float64
reference like any other; the whole differs from the direct sum by the rounding of the reordered sums (the
model-level error measured against ONNX Runtime: docs/models.md).

Which convolutions can take it is :func:`applies`' rule: ungrouped 3x3, stride 1, dilation 1, in
a blocked layout. ``--layout auto`` takes it for those with enough output tiles
(:func:`worth_it`), ``NCHW<b>c+winograd`` (or ``auto+winograd``) for all of them, ``NCHW<b>c``
for none; ``scripts/bench-model --layouts auto,NCHW16c`` times both forms of a model.
"""

from __future__ import annotations

import numpy as np

TILE = 4
"""m of F(m x m, 3 x 3). 4 cuts multiplications 4x against the direct kernel (2 would cut 2.25x
with smaller transforms; 6 adds rounding error for little more)."""


def matrices(m: int = TILE, r: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, G) of F(m, r) as float64 arrays of shapes (m+r-1, m), (m+r-1, m+r-1), (m+r-1, r),
    from TVM's Cook-Toom construction (the interpolation points topi's Winograd kernels use)."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    a, b, g = _cook_toom_convolution(_interpolation_points(m + r - 2), m, r)
    return np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(g, np.float64)


def applies(kernel_hw: tuple[int, int], strides, dilation, groups: int, dtype: str = "float32") -> bool:
    """A convolution Winograd F(m x m, 3 x 3) computes: ungrouped, 3x3, stride 1, dilation 1, in
    float32 (in float16 its transforms' rounding would be far above the direct kernel's)."""
    return (dtype == "float32" and tuple(int(k) for k in kernel_hw) == (3, 3) and all(int(s) == 1 for s in strides)
            and all(int(d) == 1 for d in dilation) and int(groups) == 1)


MIN_TILES = 32
"""``auto`` takes Winograd for a convolution with at least this many output tiles. The batch
matmul reuses each transformed weight once per tile, and the transformed weights are 4x the
weights (36 against 9 values per channel pair): with few tiles (a 14 x 14 image has 16, a 7 x 7
one 4) its time goes to streaming them, where the direct kernel reads the weights once. With a
few dozen tiles or more its rows fill the register tiles the search gives a matmul."""


def worth_it(tiles: int) -> bool:
    """Whether ``auto`` computes a convolution of ``tiles`` output tiles (:func:`out_tiles`) by
    Winograd (see :data:`MIN_TILES`)."""
    return tiles >= MIN_TILES


def out_tiles(h: int, w: int, padding, m: int = TILE) -> tuple[int, int, int, int]:
    """(output rows, output columns, tile rows, tile columns) of a 3x3 stride-1 convolution."""
    pt, pl, pb, pr = (int(x) for x in padding)
    oh, ow = h + pt + pb - 2, w + pl + pr - 2
    return oh, ow, -(-oh // m), -(-ow // m)


def weight_transform(kernel, m: int = TILE):
    """``U[a, ci, co] = (G g G^T)[a]`` of a blocked ``OIHW{b}o`` kernel ``(Co/b, Ci, 3, 3, b)``, ``a``
    the (row, column) of the transformed tile flattened: the second operand of the batch matmul.
    Its input is a constant, so this runs once when the model is compiled."""
    from tvm import te
    from tvm.topi.nn.winograd_util import const_matrix

    _, _, g = matrices(m)
    alpha = m + 2
    cob, ci, _, _, b = (int(d) for d in kernel.shape)
    gm = const_matrix(g.astype(str(kernel.dtype)), "G")
    rk, rl = te.reduce_axis((0, 3), "rk"), te.reduce_axis((0, 3), "rl")
    return te.compute((alpha * alpha, ci, cob * b), lambda a, i, o: te.sum(
        gm[a // alpha, rk] * kernel[o // b, i, rk, rl, o % b] * gm[a % alpha, rl], axis=[rk, rl]),
        name="winograd_weight")


class _Vec:
    """TVMScript text of ``b``-lane vector arithmetic. The transforms are written with explicit
    vectors (ramp loads and stores along the channel block, local buffers of vectors) rather than
    vectorized loops: MetaSchedule's build rejects a vectorized loop around a block's local
    allocation, and a block with a vectorized loop outside it shares its scalar locals across
    the lanes."""

    def __init__(self, dtype: str, lanes: int):
        self.dtype, self.lanes = dtype, lanes
        self.zero = self.const(0.0)

    def const(self, x: float) -> str:
        return f"T.Broadcast(T.{self.dtype}({float(x)!r}), {self.lanes})"

    def ramp(self, base: str) -> str:
        return f"T.Ramp({base}, T.int64(1), {self.lanes})"

    def combine(self, coefs, terms: list[str]) -> str:
        """``sum(c * t)`` with the zero coefficients left out and the unit ones not multiplied."""
        parts = [t if c == 1 else f"{self.zero} - {t}" if c == -1 else f"{self.const(c)} * {t}"
                 for c, t in zip(coefs, terms) if c != 0]
        return " + ".join(parts) or self.zero


def _prim(params: str, name: str, parallel: int, inner: str, locals_: list[tuple[str, tuple[int, int]]],
          body: list[str], dtype: str, lanes: int, attrs: str = ""):
    """A PrimFunc: a parallel loop over ``parallel`` (tile, channel block) pairs, each one block
    with local vector buffers ``locals_`` running ``body``. The block's iterators are opaque:
    MetaSchedule's parallelize-vectorize postprocessor would otherwise split the parallel loop
    and vectorize its inner part around the block's vector code (TVM then crashes)."""
    import tvm

    allocs = "".join(f'            {n} = T.sblock_alloc_buffer({shape}, "{dtype}x{lanes}", scope="local")\n'
                     for n, shape in locals_)
    src = f"""# from tvm.script import tirx as T
@T.prim_func(s_tir=True)
def main({params}):
    T.func_attr({{"tirx.noalias": True{attrs}}})
    for pc in T.parallel(T.int64({parallel})):
        with T.sblock("{name}"):
{inner}
{allocs}""" + "\n".join("            " + line for line in body) + "\n"
    return tvm.script.from_source(src).without_attr("global_symbol")  # private, as call_te makes them


def input_transform(shape, padding, m: int = TILE, dtype: str = "float32"):
    """The PrimFunc ``V[a, p, ci] = (B^T d B)[a]`` of every input tile ``d`` of blocked data of
    ``shape`` ``(N, C/b, H, W, b)``: ``p`` the tile (image, tile row, tile column), ``ci`` the
    channel. One block per (tile, channel block) computes all (m+2)^2 vectors from the tile in
    local buffers (the tile, then ``d B``, then ``B^T (d B)``), as straight-line sums with ``B``'s
    entries as literals and its zeros left out. Written as TE reductions with ``B`` a tensor
    instead (two stages: rows, then columns), the search kept the stages apart, the intermediate
    went through memory and every product read ``B`` and multiplied its zeros (docs/models.md has
    the times of both). Its loops come scheduled: the search has nothing to choose here."""
    n, cb, h, w, b = (int(d) for d in shape)
    pt, pl, _, _ = (int(x) for x in padding)
    _, _, th, tw = out_tiles(h, w, padding, m)
    alpha, tiles = m + 2, n * th * tw
    bt = matrices(m)[1].T
    v = _Vec(dtype, b)

    def at(k: int, col: int) -> str:  # the tile's (k, col) input vector, zero in the padding
        y, x = f"vp % {th * tw} // {tw} * {m} + {k - pt}", f"vp % {tw} * {m} + {col - pl}"
        return f"T.if_then_else(0 <= {y} and {y} < {h} and 0 <= {x} and {x} < {w}, " \
               f"data[vp // {th * tw}, vc0, {y}, {x}, {v.ramp('T.int64(0)')}], {v.zero})"

    body = [f"d[{k}, {col}] = {at(k, col)}" for k in range(alpha) for col in range(alpha)]
    body += [f"r[{k}, {a}] = {v.combine(bt[a], [f'd[{k}, {col}]' for col in range(alpha)])}"
             for k in range(alpha) for a in range(alpha)]
    body += [f"V[{a1 * alpha + a2}, vp, {v.ramp(f'vc0 * {b}')}] = "
             f"{v.combine(bt[a1], [f'r[{k}, {a2}]' for k in range(alpha)])}" for a1 in range(alpha) for a2 in range(alpha)]
    inner = (f"            vp = T.axis.opaque(T.int64({tiles}), pc // T.int64({cb}))\n"
             f"            vc0 = T.axis.opaque(T.int64({cb}), pc % T.int64({cb}))")
    return _prim(f'data: T.Buffer({_dims(n, cb, h, w, b)}, "{dtype}"), '
                 f'V: T.Buffer({_dims(alpha * alpha, tiles, cb * b)}, "{dtype}")',
                 "winograd_input", tiles * cb, inner, [("d", (alpha, alpha)), ("r", (alpha, alpha))], body, dtype, b)


def output_transform(tiles: int, shape, m: int = TILE, dtype: str = "float32"):
    """The PrimFunc ``Y = A^T M A`` of the batch matmul's product ``M`` ``(alpha^2, tiles, Co)`` into
    a blocked output of ``shape`` ``(N, Co/b, OH, OW, b)``, written as :func:`input_transform` is;
    the values past the output's edge in the last row or column of tiles are not stored. Its
    ``op_pattern`` (4, out-element-wise fusable) lets the convolution's element-wise epilogue fuse
    after it, as after a direct convolution."""
    alpha = m + 2
    n, cob, oh, ow, b = (int(d) for d in shape)
    th, tw = -(-oh // m), -(-ow // m)
    at_ = matrices(m)[0].T
    v = _Vec(dtype, b)
    y0, x0 = f"vp % {th * tw} // {tw} * {m}", f"vp % {tw} * {m}"
    body = [f"g[{e}, {nu}] = M[{e * alpha + nu}, vp, {v.ramp(f'vc0 * {b}')}]" for e in range(alpha) for nu in range(alpha)]
    body += [f"t[{i}, {nu}] = {v.combine(at_[i], [f'g[{e}, {nu}]' for e in range(alpha)])}"
             for i in range(m) for nu in range(alpha)]
    for i in range(m):
        for j in range(m):
            guard = " and ".join(([f"{y0} + {i} < {oh}"] if th * m > oh else [])
                                 + ([f"{x0} + {j} < {ow}"] if tw * m > ow else []))
            store = (f"Y[vp // {th * tw}, vc0, {y0} + {i}, {x0} + {j}, {v.ramp('T.int64(0)')}] = "
                     f"{v.combine(at_[j], [f't[{i}, {nu}]' for nu in range(alpha)])}")
            body += [f"if {guard}:", f"    {store}"] if guard else [store]
    inner = (f"            vp = T.axis.opaque(T.int64({tiles}), pc // T.int64({cob}))\n"
             f"            vc0 = T.axis.opaque(T.int64({cob}), pc % T.int64({cob}))")
    return _prim(f'M: T.Buffer({_dims(alpha * alpha, tiles, cob * b)}, "{dtype}"), '
                 f'Y: T.Buffer({_dims(n, cob, oh, ow, b)}, "{dtype}")',
                 "winograd_output", tiles * cob, inner, [("g", (alpha, alpha)), ("t", (m, alpha))], body, dtype, b,
                 attrs=', "op_pattern": 4')


def _dims(*dims: int) -> str:
    """A buffer shape in TVMScript with int64 extents, as TE writes them: FuseTIR maps a fused
    group's buffers by type, and an int32 extent would not match the epilogue's."""
    return "(" + ", ".join(f"T.int64({d})" for d in dims) + ")"


def batch_matmul(v, u):
    """``M[a, p, co] = sum_ci V[a, p, ci] U[a, ci, co]``, as Relax legalizes a batched ``matmul``."""
    from tvm import te

    ci = te.reduce_axis((0, int(v.shape[2])), "k")
    return te.compute((int(v.shape[0]), int(v.shape[1]), int(u.shape[2])), lambda a, p, co: te.sum(
        v[a, p, ci] * u[a, ci, co], axis=ci), name="T_matmul")


def winograd_nchwc(bb, call, m: int = TILE):
    """Relax for the blocked convolution ``call`` (``NCHW{b}c`` data, ``OIHW{b}o`` kernel) as
    Winograd F(m x m, 3 x 3): the weight transform (folded at compile time), the input transform,
    the batch matmul and the output transform, each its own ``call_tir``."""
    from tvm import relax

    dtype = str(call.ty.dtype)
    data, kernel = call.args
    padding = [int(x) for x in call.attrs.padding]
    # names: the output transform is where the convolution's epilogue fuses and what --profile
    # matches ONNX Runtime's convolution node to (models.profile); the other two are no operator
    # of ONNX's
    u = bb.emit_te(weight_transform, kernel, m=m, primfunc_name_hint="winograd_weight")
    shape = [int(d) for d in data.ty.shape.values]
    _, _, th, tw = out_tiles(shape[2], shape[3], padding, m)
    gv = bb.add_func(input_transform(shape, padding, m, dtype), "winograd_input")
    v = bb.emit(relax.call_tir(gv, [data], relax.TensorType([(m + 2) ** 2, shape[0] * th * tw, shape[1] * shape[4]],
                                                           dtype)))
    prod = bb.emit_te(batch_matmul, v, u, primfunc_name_hint="winograd_gemm")
    out = [int(d) for d in call.ty.shape.values]
    gv = bb.add_func(output_transform(shape[0] * th * tw, out, m, dtype), "conv2d_winograd_output")
    return relax.call_tir(gv, [prod], relax.TensorType(out, dtype))
