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

A layout is a choice per model (``--layout``), not a rule: which is faster depends on the
shapes, the CPU and the share, so it is measured (``scripts/bench-model --layouts``).
"""

from __future__ import annotations

import re

from ..errors import ConfigError

PLAIN = "nchw"


def parse_layout(text: str | None) -> int | None:
    """``nchw`` (or None) -> None; ``NCHW16c`` -> 16. ConfigError for anything else."""
    if text is None or text.strip().lower() == PLAIN:
        return None
    m = re.fullmatch(r"nchw(\d+)c", text.strip().lower())
    if not m or int(m.group(1)) < 2:
        raise ConfigError(f"--layout {text!r}: expected nchw or NCHW<b>c with a block b >= 2 (e.g. NCHW16c: 16 fp32 "
                          "lanes of AVX-512, NCHW8c for AVX2)")
    return int(m.group(1))


def layout_name(block: int | None) -> str:
    return PLAIN if block is None else f"NCHW{block}c"


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
        relax.transform.LegalizeOps({"relax.nn.conv2d": conv2d}),
    ])
    with tvm.transform.PassContext(opt_level=3):
        return seq(mod)


def _op_names(mod) -> set[str]:
    from tvm import ir, relax

    names: set[str] = set()

    @relax.expr_functor.visitor
    class _Ops(relax.PyExprVisitor):
        def visit_call_(self, call) -> None:
            if isinstance(call.op, ir.Op):
                names.add(call.op.name)
            super().visit_call_(call)

    for fn in mod.functions.values():
        if isinstance(fn, relax.Function):
            _Ops().visit_expr(fn)
    return names
