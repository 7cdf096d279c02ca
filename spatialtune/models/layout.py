"""Blocked channel layouts for a model's convolutions (NCHW{b}c), as ONNX Runtime's MLAS and TVM's
own x86 schedules run them.

In NCHW the innermost axis of a convolution's output is a row of pixels (56, 28, 14, 7 in a
ResNet), which whole vector registers rarely divide, and its weights are read along input
channels. In ``NCHW{b}c`` the innermost axis is a block of ``b`` output channels: with ``b`` the
vector width, one weight vector load feeds an FMA per output pixel of the register tile, a
broadcast input value each, whatever the row length. :func:`to_blocked` rewrites a Relax model
that way with Relax's own ``ConvertLayout``: every convolution whose channel counts ``b`` divides
takes ``NCHW{b}c`` data and ``OIHW{b}o`` weights (folded at compile time, they are constants);
grouped (depthwise) convolutions stay NCHW, as no blocked kernel here takes them;
element-wise operators follow, and layout transforms are inserted only where the graph changes
layout (its inputs and outputs, and around a convolution left in NCHW): those are tasks of the
model like any other, so their time is in its latency.

``auto`` (the default) blocks by this CPU's fp32 vector width (16 with AVX-512, 8 with AVX, else
4) when every convolution of the model can take that layout, and keeps NCHW otherwise: a
convolution left in NCHW in a blocked graph costs two layout transforms of its activations, and
a grouped (depthwise) convolution, which no blocked kernel here takes, is the usual reason. An
explicit ``NCHW<b>c`` blocks what it can. Which is faster depends on the shapes, the CPU and the
share, so ``scripts/bench-model --layouts`` measures both.
"""

from __future__ import annotations

import re

from ..errors import ConfigError

PLAIN = "nchw"
AUTO = "auto"


def parse_layout(text: str | None) -> int | None:
    """``nchw`` (or None) -> None; ``NCHW16c`` -> 16; ``auto`` -> this CPU's fp32 lanes.
    ConfigError for anything else."""
    if text is None or text.strip().lower() == PLAIN:
        return None
    if text.strip().lower() == AUTO:
        return host_lanes()
    m = re.fullmatch(r"nchw(\d+)c", text.strip().lower())
    if not m or int(m.group(1)) < 2:
        raise ConfigError(f"--layout {text!r}: expected auto, nchw or NCHW<b>c with a block b >= 2 (e.g. NCHW16c: "
                          "16 fp32 lanes of AVX-512, NCHW8c for AVX2)")
    return int(m.group(1))


def layout_name(block: int | None) -> str:
    return PLAIN if block is None else f"NCHW{block}c"


def host_lanes() -> int:
    """fp32 lanes of this CPU's widest vector registers, as the kernel reports its features."""
    from ..device import cpu_flags

    flags = cpu_flags()
    return 16 if "avx512f" in flags else 8 if "avx" in flags else 4


def resolve(mod, text: str | None) -> tuple[object, int | None]:
    """(``mod`` in the layout ``text`` asks for, its block or None for NCHW); ``auto`` blocks
    only when every convolution takes the block (see the module doc)."""
    block = parse_layout(text)
    if block is None:
        return mod, None
    if (text or "").strip().lower() == AUTO:
        convs = _convolutions(mod)
        if not convs or any(g != 1 or c % block or o % block for c, o, g in convs):
            return mod, None
    return to_blocked(mod, block), block


def to_blocked(mod, block: int):
    """``mod`` (a Relax module before legalization) with its convolutions in ``NCHW{block}c``."""
    import tvm
    from tvm import relax, topi
    from tvm.relax.transform.legalize_ops.nn import _nn_conv2d

    def conv2d(bb, call):
        if call.attrs.data_layout == call.attrs.out_layout == f"NCHW{block}c" \
                and call.attrs.kernel_layout == f"OIHW{block}o":
            return bb.call_te(topi.nn.conv2d_NCHWc_OIHWo, data=call.args[0], kernel=call.args[1],
                              stride=call.attrs.strides, padding=call.attrs.padding, dilation=call.attrs.dilation,
                              layout=call.attrs.data_layout, out_layout=call.attrs.out_layout,
                              primfunc_name_hint="conv2d_NCHWc")
        return _nn_conv2d(bb, call)  # a convolution ConvertLayout left in NCHW (channels b does not divide)

    def grouped_first(bb, call):  # grouped (depthwise) convolutions stay NCHW: no blocked kernel takes them
        return _nn_conv2d(bb, call) if int(call.attrs.groups) != 1 else call

    others = sorted(_op_names(mod) - {"relax.nn.conv2d"})  # the element-wise ops must follow the layout
    seq = tvm.transform.Sequential([
        relax.transform.LegalizeOps({"relax.nn.conv2d": grouped_first}, skip_ops=others),
        relax.transform.ConvertLayout({"relax.nn.conv2d": [f"NCHW{block}c", f"OIHW{block}o", f"NCHW{block}c"]}),
        relax.transform.Normalize(),
        # one transform of an input read by two convolutions (a residual block's first conv and
        # its projection), not one per reader
        relax.transform.EliminateCommonSubexpr(),
        relax.transform.LegalizeOps({"relax.nn.conv2d": conv2d}),
    ])
    with tvm.transform.PassContext(opt_level=3):
        return seq(mod)


def _calls(mod) -> list:
    from tvm import ir, relax

    calls: list = []

    @relax.expr_functor.visitor
    class _Ops(relax.PyExprVisitor):
        def visit_call_(self, call) -> None:
            if isinstance(call.op, ir.Op):
                calls.append(call)
            super().visit_call_(call)

    for fn in mod.functions.values():
        if isinstance(fn, relax.Function):
            _Ops().visit_expr(fn)
    return calls


def _op_names(mod) -> set[str]:
    return {c.op.name for c in _calls(mod)}


def _convolutions(mod) -> list[tuple[int, int, int]]:
    """(input channels, output channels, groups) of every conv2d of ``mod``; one that is not a
    static NCHW/OIHW convolution counts with groups 0, so ``auto`` leaves the model NCHW."""
    out = []
    for c in _calls(mod):
        if c.op.name != "relax.nn.conv2d":
            continue
        try:
            data = [int(d) for d in c.args[0].ty.shape.values]
            weight = [int(d) for d in c.args[1].ty.shape.values]
            ok = c.attrs.data_layout == "NCHW" and c.attrs.kernel_layout == "OIHW"
            out.append((data[1], weight[0], int(c.attrs.groups)) if ok else (1, 1, 0))
        except (TypeError, ValueError, AttributeError):
            out.append((1, 1, 0))  # a dynamic or unknown shape: not something to block blindly
    return out
