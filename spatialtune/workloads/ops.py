"""Operators: the tensor expression to tune, its float64 numpy reference, its inputs and its cost.

Every operator is declared once in ``OPERATORS``; the search-space files name them. The TE
definitions are written here rather than taken from ``tvm.topi`` on purpose: topi marks weights
as layout-free, MetaSchedule then rewrites their layout, and a candidate's inputs would no longer
be the arrays the numpy reference reads.

TVM is imported only inside :meth:`Operator.prim_func`, so a runner on a GPU host that carries a
runtime-only TVM can still compute references and shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from ..errors import SpecError

DTYPES = {"fp32": ("float32", "float32"), "fp16": ("float16", "float32")}
"""dtype name -> (input dtype, output/accumulation dtype). fp16 accumulates in fp32, as
frameworks' mixed-precision kernels do."""



@dataclass(frozen=True)
class Operator:
    name: str
    params: tuple[str, ...]
    defaults: Mapping[str, int]
    dtypes: tuple[str, ...]
    input_shapes: Callable[[Mapping[str, int]], list[tuple[int, ...]]]
    output_shape: Callable[[Mapping[str, int]], tuple[int, ...]]
    flops: Callable[[Mapping[str, int]], int]
    reference: Callable[[Mapping[str, int], list[np.ndarray]], np.ndarray]
    te_builder: Callable[..., list]
    doc: str = ""
    revision: int = 0  # bump when what the operator computes changes (its inputs, layout, reference)

    def check_params(self, given: Mapping[str, int]) -> dict[str, int]:
        """Return the full parameter dict or raise SpecError naming the offending field."""
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            raise SpecError(f"unknown shape field {unknown[0]!r} for {self.name} (fields: {', '.join(self.params)})")
        full = dict(self.defaults)
        full.update(given)
        missing = [p for p in self.params if p not in full]
        if missing:
            raise SpecError(f"missing shape field {missing[0]!r} for {self.name}")
        for k in self.params:
            v = full[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (v == 0 and k not in ("pad", "transpose_b")):
                raise SpecError(f"shape field {k!r} of {self.name} must be a positive integer, got {v!r}")
        if "transpose_b" in full and full["transpose_b"] not in (0, 1):
            raise SpecError(f"shape field 'transpose_b' of {self.name} must be 0 or 1, got {full['transpose_b']!r}")
        return {k: full[k] for k in self.params}

    def prim_func(self, p: Mapping[str, int], dtype: str):
        """The TIR PrimFunc for these parameters (imports TVM)."""
        from tvm import te

        in_dt, out_dt = DTYPES[dtype]
        tensors = self.te_builder(te, p, in_dt, out_dt)
        return te.create_prim_func(tensors).with_attr("global_symbol", "main")

    def random_inputs(self, p: Mapping[str, int], dtype: str, rng: np.random.Generator) -> list[np.ndarray]:
        in_dt, _ = DTYPES[dtype]
        return [rng.uniform(-1.0, 1.0, size=s).astype(in_dt) for s in self.input_shapes(p)]

    def out_dtype(self, dtype: str) -> str:
        return DTYPES[dtype][1]


# ---------------------------------------------------------------- matmul / dense


def _matmul_te(te, p, in_dt, out_dt):
    A = te.placeholder((p["M"], p["K"]), in_dt, name="A")
    B = te.placeholder((p["K"], p["N"]), in_dt, name="B")
    k = te.reduce_axis((0, p["K"]), name="k")
    C = te.compute(
        (p["M"], p["N"]),
        lambda i, j: te.sum(A[i, k].astype(out_dt) * B[k, j].astype(out_dt), axis=k),
        name="C",
    )
    return [A, B, C]


def _dense_te(te, p, in_dt, out_dt):
    X = te.placeholder((p["M"], p["K"]), in_dt, name="X")
    W = te.placeholder((p["N"], p["K"]), in_dt, name="W")
    k = te.reduce_axis((0, p["K"]), name="k")
    Y = te.compute(
        (p["M"], p["N"]),
        lambda i, j: te.sum(X[i, k].astype(out_dt) * W[j, k].astype(out_dt), axis=k),
        name="Y",
    )
    return [X, W, Y]


def _batch_matmul_te(te, p, in_dt, out_dt):
    A = te.placeholder((p["B"], p["M"], p["K"]), in_dt, name="A")
    if p["transpose_b"]:
        B = te.placeholder((p["B"], p["N"], p["K"]), in_dt, name="B")
        rhs = lambda b, j, k: B[b, j, k]  # noqa: E731
    else:
        B = te.placeholder((p["B"], p["K"], p["N"]), in_dt, name="B")
        rhs = lambda b, j, k: B[b, k, j]  # noqa: E731
    k = te.reduce_axis((0, p["K"]), name="k")
    C = te.compute(
        (p["B"], p["M"], p["N"]),
        lambda b, i, j: te.sum(A[b, i, k].astype(out_dt) * rhs(b, j, k).astype(out_dt), axis=k),
        name="C",
    )
    return [A, B, C]


# ---------------------------------------------------------------- convolutions (NCHW)


def _out_hw(p):
    oh = (p["H"] + 2 * p["pad"] - p["R"]) // p["stride"] + 1
    ow = (p["W"] + 2 * p["pad"] - p["S"]) // p["stride"] + 1
    if oh <= 0 or ow <= 0:
        raise SpecError(f"convolution output is empty (H={p['H']} W={p['W']} R={p['R']} S={p['S']} pad={p['pad']})")
    return oh, ow


def _padded(te, data, p, name):
    pad = p["pad"]
    if pad == 0:
        return data
    n, c, h, w = data.shape
    from tvm import tirx

    return te.compute(
        (n, c, h + 2 * pad, w + 2 * pad),
        lambda i, j, y, x: tirx.if_then_else(
            tirx.all(y >= pad, y < h + pad, x >= pad, x < w + pad),
            data[i, j, y - pad, x - pad],
            tirx.const(0, data.dtype),
        ),
        name=name,
    )


def _conv2d_te(te, p, in_dt, out_dt):
    oh, ow = _out_hw(p)
    data = te.placeholder((p["N"], p["C"], p["H"], p["W"]), in_dt, name="data")
    weight = te.placeholder((p["K"], p["C"], p["R"], p["S"]), in_dt, name="weight")
    padded = _padded(te, data, p, "pad_data")
    rc = te.reduce_axis((0, p["C"]), name="rc")
    ry = te.reduce_axis((0, p["R"]), name="ry")
    rx = te.reduce_axis((0, p["S"]), name="rx")
    st = p["stride"]
    out = te.compute(
        (p["N"], p["K"], oh, ow),
        lambda n, k, y, x: te.sum(
            padded[n, rc, y * st + ry, x * st + rx].astype(out_dt) * weight[k, rc, ry, rx].astype(out_dt),
            axis=[rc, ry, rx],
        ),
        name="conv",
    )
    return [data, weight, out]


def _depthwise_te(te, p, in_dt, out_dt):
    oh, ow = _out_hw(p)
    data = te.placeholder((p["N"], p["C"], p["H"], p["W"]), in_dt, name="data")
    weight = te.placeholder((p["C"], 1, p["R"], p["S"]), in_dt, name="weight")
    padded = _padded(te, data, p, "pad_data")
    ry = te.reduce_axis((0, p["R"]), name="ry")
    rx = te.reduce_axis((0, p["S"]), name="rx")
    st = p["stride"]
    out = te.compute(
        (p["N"], p["C"], oh, ow),
        lambda n, c, y, x: te.sum(
            padded[n, c, y * st + ry, x * st + rx].astype(out_dt) * weight[c, 0, ry, rx].astype(out_dt),
            axis=[ry, rx],
        ),
        name="dwconv",
    )
    return [data, weight, out]


def conv_reference(p, xs, depthwise):
    data, weight = (x.astype(np.float64) for x in xs)
    pad, st = p["pad"], p["stride"]
    oh, ow = _out_hw(p)
    d = np.pad(data, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    # Windows as a strided view: N, C, OH, OW, R, S without copying the input R*S times.
    win = np.lib.stride_tricks.sliding_window_view(d, (p["R"], p["S"]), axis=(2, 3))[:, :, ::st, ::st][:, :, :oh, :ow]
    if depthwise:
        return np.einsum("ncyxrs,crs->ncyx", win, weight[:, 0], optimize=True)
    return np.einsum("ncyxrs,kcrs->nkyx", win, weight, optimize=True)


OPERATORS: dict[str, Operator] = {}


def _register(op: Operator) -> None:
    OPERATORS[op.name] = op


_register(
    Operator(
        name="matmul",
        params=("M", "N", "K"),
        defaults={},
        dtypes=("fp32", "fp16"),
        input_shapes=lambda p: [(p["M"], p["K"]), (p["K"], p["N"])],
        output_shape=lambda p: (p["M"], p["N"]),
        flops=lambda p: 2 * p["M"] * p["N"] * p["K"],
        reference=lambda p, xs: xs[0].astype(np.float64) @ xs[1].astype(np.float64),
        te_builder=_matmul_te,
        doc="C[M,N] = A[M,K] @ B[K,N]",
    )
)
_register(
    Operator(
        name="dense",
        params=("M", "N", "K"),
        defaults={},
        dtypes=("fp32", "fp16"),
        input_shapes=lambda p: [(p["M"], p["K"]), (p["N"], p["K"])],
        output_shape=lambda p: (p["M"], p["N"]),
        flops=lambda p: 2 * p["M"] * p["N"] * p["K"],
        reference=lambda p, xs: xs[0].astype(np.float64) @ xs[1].astype(np.float64).T,
        te_builder=_dense_te,
        doc="Y[M,N] = X[M,K] @ W[N,K]^T (a linear layer's weight layout)",
    )
)
_register(
    Operator(
        name="batch_matmul",
        params=("B", "M", "N", "K", "transpose_b"),
        defaults={"transpose_b": 0},
        dtypes=("fp32", "fp16"),
        input_shapes=lambda p: [
            (p["B"], p["M"], p["K"]),
            (p["B"], p["N"], p["K"]) if p["transpose_b"] else (p["B"], p["K"], p["N"]),
        ],
        output_shape=lambda p: (p["B"], p["M"], p["N"]),
        flops=lambda p: 2 * p["B"] * p["M"] * p["N"] * p["K"],
        reference=lambda p, xs: xs[0].astype(np.float64)
        @ (xs[1].astype(np.float64).transpose(0, 2, 1) if p["transpose_b"] else xs[1].astype(np.float64)),
        te_builder=_batch_matmul_te,
        doc="C[b,M,N] = A[b,M,K] @ B[b,K,N] (B[b,N,K]^T with transpose_b=1, as in Q @ K^T)",
    )
)
_register(
    Operator(
        name="conv2d",
        params=("N", "C", "H", "W", "K", "R", "S", "stride", "pad"),
        defaults={"stride": 1, "pad": 0},
        dtypes=("fp32", "fp16"),
        input_shapes=lambda p: [(p["N"], p["C"], p["H"], p["W"]), (p["K"], p["C"], p["R"], p["S"])],
        output_shape=lambda p: (p["N"], p["K"], *_out_hw(p)),
        flops=lambda p: 2 * p["N"] * p["K"] * _out_hw(p)[0] * _out_hw(p)[1] * p["C"] * p["R"] * p["S"],
        reference=lambda p, xs: conv_reference(p, xs, depthwise=False),
        te_builder=_conv2d_te,
        doc="NCHW convolution, KCRS weights",
    )
)
_register(
    Operator(
        name="depthwise_conv2d",
        params=("N", "C", "H", "W", "R", "S", "stride", "pad"),
        defaults={"stride": 1, "pad": 0},
        dtypes=("fp32", "fp16"),
        input_shapes=lambda p: [(p["N"], p["C"], p["H"], p["W"]), (p["C"], 1, p["R"], p["S"])],
        output_shape=lambda p: (p["N"], p["C"], *_out_hw(p)),
        flops=lambda p: 2 * p["N"] * p["C"] * _out_hw(p)[0] * _out_hw(p)[1] * p["R"] * p["S"],
        reference=lambda p, xs: conv_reference(p, xs, depthwise=True),
        te_builder=_depthwise_te,
        doc="NCHW depthwise convolution (channel multiplier 1), C1RS weights",
    )
)


def get_operator(name: str) -> Operator:
    try:
        return OPERATORS[name]
    except KeyError:
        raise SpecError(f"unknown operator {name!r} (known: {', '.join(sorted(OPERATORS))})") from None
