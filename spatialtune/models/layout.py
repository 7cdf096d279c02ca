"""Blocked channel layouts for a model's convolutions (NCHW{b}c), as ONNX Runtime's MLAS and TVM's
own x86 schedules run them.

In NCHW the innermost axis of a convolution's output is a row of pixels (56, 28, 14, 7 in a
ResNet), which whole vector registers rarely divide, and its weights are read along input
channels. In ``NCHW{b}c`` the innermost axis is a block of ``b`` output channels: with ``b`` the
vector width, one weight vector load feeds an FMA per output pixel of the register tile, a
broadcast input value each, whatever the row length. :func:`to_blocked` rewrites a Relax model
that way with Relax's own ``ConvertLayout``: every convolution whose channel counts ``b`` divides
takes ``NCHW{b}c`` data and ``OIHW{b}o`` weights (folded at compile time, they are constants);
a depthwise convolution (one filter per channel) takes it as well (:func:`depthwise_nchwc`: a
channel block is a vector there too); other grouped convolutions stay NCHW, as no blocked kernel
here takes them. Element-wise operators follow, ReLU6 included (:func:`lift_scalar_elementwise`),
and layout transforms are inserted only where the graph changes layout (its inputs and outputs,
and around a convolution left in NCHW): those are tasks of the model like any other, so their
time is in its latency.

``auto`` (the default) blocks by this CPU's fp32 vector width (16 with AVX-512, 8 with AVX, else
4) when every convolution of the model can take that layout, else by half of it when that can
(:func:`auto_block`), and keeps NCHW otherwise: a convolution left in NCHW in a blocked graph
costs two layout transforms of its activations. An explicit ``NCHW<b>c`` blocks what it can. Which is faster depends on the shapes, the CPU and the
share, so ``scripts/bench-model --layouts`` measures both.

A blocked layout may also change how 3x3 stride-1 convolutions compute: as Winograd F(4x4, 3x3)
(:mod:`.winograd`), four times fewer multiplications for two transforms. ``auto`` takes it for
those with enough output tiles (:func:`.winograd.worth_it`), ``NCHW<b>c+winograd`` and
``auto+winograd`` for all of them, a plain ``NCHW<b>c`` for none; the model's name ends in
``-winograd`` when any convolution took it.
"""

from __future__ import annotations

import re

from ..errors import ConfigError

PLAIN = "nchw"
AUTO = "auto"


WINOGRAD = "+winograd"
"""Suffix of a blocked layout whose 3x3 stride-1 convolutions run as Winograd F(4x4, 3x3)
(:mod:`.winograd`): ``NCHW16c+winograd``, ``auto+winograd``."""


def split_winograd(text: str | None) -> tuple[str | None, bool]:
    """(the layout without ``+winograd``, whether it was there)."""
    if text is not None and text.strip().lower().endswith(WINOGRAD):
        return text.strip()[:-len(WINOGRAD)], True
    return text, False


def parse_layout(text: str | None) -> int | None:
    """``nchw`` (or None) -> None; ``NCHW16c`` -> 16; ``auto`` -> this CPU's fp32 lanes; either
    blocked one may end in ``+winograd``. ConfigError for anything else."""
    base, winograd = split_winograd(text)
    if base is None or base.strip().lower() == PLAIN:
        if winograd:
            raise ConfigError(f"--layout {text!r}: +winograd goes with a blocked layout (auto+winograd or "
                              "NCHW<b>c+winograd): its transforms vectorise along the channel block")
        return None
    if base.strip().lower() == AUTO:
        return host_lanes()
    m = re.fullmatch(r"nchw(\d+)c", base.strip().lower())
    if not m or int(m.group(1)) < 2:
        raise ConfigError(f"--layout {text!r}: expected auto, nchw or NCHW<b>c with a block b >= 2 (e.g. NCHW16c: "
                          "16 fp32 lanes of AVX-512, NCHW8c for AVX2), a blocked one optionally with +winograd")
    return int(m.group(1))


def layout_name(block: int | None, winograd: bool = False) -> str:
    return PLAIN if block is None else f"NCHW{block}c" + (WINOGRAD if winograd else "")


def host_lanes() -> int:
    """fp32 lanes of this CPU's widest vector registers, as the kernel reports its features."""
    from ..device import cpu_flags

    flags = cpu_flags()
    return 16 if "avx512f" in flags else 8 if "avx" in flags else 4


def resolve(mod, text: str | None) -> tuple[object, int | None, bool]:
    """(``mod`` in the layout ``text`` asks for, its block or None for NCHW, whether any
    convolution became Winograd); ``auto`` blocks only when every convolution takes the block (see
    the module doc); a model without convolutions keeps its name and tasks in any layout."""
    block = parse_layout(text)
    base, winograd = split_winograd(text)
    auto = (base or "").strip().lower() == AUTO
    if block is None:
        return mod, None, False
    convs = _convolutions(mod)
    if auto:
        block = auto_block(convs, block)
    if block is None or not convs:  # a model without convolutions is the same in every layout
        return mod, None, False
    done: list = []
    mode = "all" if winograd else "auto" if auto else None
    return to_blocked(mod, block, mode, done), block, bool(done)


def auto_block(convs: list[tuple[int, int, int, int]], lanes: int) -> int | None:
    """The block ``auto`` gives a model whose convolutions are ``convs`` ((input channels, output
    channels, groups, output pixels), groups 1 for a depthwise one that blocks): the vector width
    ``lanes`` if it divides every convolution, else half of it (a half-width vector, still whole
    registers: MobileNet's 24 and 144 channels take 8, not 16), else None (NCHW). A convolution with
    a single output pixel (a squeeze-and-excitation's, a classifier's) does not count: left in
    NCHW, its layout transforms move a few hundred values."""
    for b in (lanes, lanes // 2):
        if b >= 4 and convs and all(px == 1 and g > 0 or (g == 1 and c % b == 0 and o % b == 0)
                                    for c, o, g, px in convs):
            return b
    return None


def to_blocked(mod, block: int, winograd: str | None = None, converted: list | None = None):
    """``mod`` (a Relax module before legalization) with its convolutions in ``NCHW{block}c``;
    ``winograd`` ``"all"``: those Winograd computes (:func:`.winograd.applies`) as its three tasks,
    ``"auto"``: those of them with enough tiles (:func:`.winograd.worth_it`); each one's result
    appended to ``converted``."""
    import tvm
    from tvm import relax, topi
    from tvm.relax.transform.legalize_ops.nn import _nn_conv2d

    from .winograd import applies, winograd_nchwc, worth_it

    def conv2d(bb, call):
        if call.attrs.data_layout == call.attrs.out_layout == f"NCHW{block}c" \
                and call.attrs.kernel_layout == f"OIHW{block}o":
            if int(call.attrs.groups) != 1:  # depthwise, the only grouped kind left to this point
                return bb.call_te(depthwise_nchwc, call.args[0], call.args[1], strides=call.attrs.strides,
                                  padding=call.attrs.padding, dilation=call.attrs.dilation,
                                  primfunc_name_hint="depthwise_conv2d_NCHWc")
            if winograd and applies(call.args[1].ty.shape.values[2:4], call.attrs.strides, call.attrs.dilation,
                                    call.attrs.groups, str(call.ty.dtype)) and (winograd == "all" or worth_it(_tiles(call))):
                out = winograd_nchwc(bb, call)
                if converted is not None:
                    converted.append(out)
                return out
            return bb.call_te(topi.nn.conv2d_NCHWc_OIHWo, data=call.args[0], kernel=call.args[1],
                              stride=call.attrs.strides, padding=call.attrs.padding, dilation=call.attrs.dilation,
                              layout=call.attrs.data_layout, out_layout=call.attrs.out_layout,
                              primfunc_name_hint="conv2d_NCHWc")
        return _nn_conv2d(bb, call)  # a convolution ConvertLayout left in NCHW (channels b does not divide)

    def grouped_first(bb, call):  # grouped convolutions other than depthwise stay NCHW: no blocked kernel takes them
        return call if _blockable(call, block) else _nn_conv2d(bb, call)

    mod = lift_scalar_elementwise(mod)
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


def _tiles(call) -> int:
    """Output tiles of Winograd F(4x4, 3x3) for the blocked convolution ``call``."""
    from .winograd import out_tiles

    n, _, h, w, _ = (int(d) for d in call.args[0].ty.shape.values)
    _, _, rows, cols = out_tiles(h, w, call.attrs.padding)
    return n * rows * cols


def depthwise_nchwc(data, kernel, strides, padding, dilation):
    """A depthwise convolution (one filter per channel) in ``NCHW{b}c``: data ``(N, C/b, H, W, b)``,
    kernel ``(C/b, 1, KH, KW, b)`` (``OIHW{b}o`` of a multiplier-1 depthwise weight). Each output
    vector of ``b`` channels is a sum of ``KH x KW`` element-wise products of an input vector and
    a weight vector, so it vectorises along the channel block as the dense kernels do; topi has
    no registered NCHWc depthwise compute for this target."""
    from tvm import te, topi

    n, cb, h, w, b = (int(d) for d in data.shape)
    kh, kw = (int(d) for d in kernel.shape[2:4])
    (sh, sw), (dh, dw) = (int(x) for x in strides), (int(x) for x in dilation)
    pt, pl, pb, pr = (int(x) for x in padding)
    pad = topi.nn.pad(data, (0, 0, pt, pl, 0), (0, 0, pb, pr, 0), name="data_pad") if pt or pl or pb or pr else data
    oh, ow = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1, (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
    return te.compute((n, cb, oh, ow, b), lambda i, c, y, x, k: te.sum(
        pad[i, c, y * sh + ry * dh, x * sw + rx * dw, k] * kernel[c, 0, ry, rx, k], axis=[ry, rx]),
        name="depthwise_conv2d_NCHWc")


def _blockable(call, block: int) -> bool:
    """A conv2d that ``to_blocked`` runs in ``NCHW{block}c``: ungrouped, or depthwise with one
    filter per channel, with static NCHW/OIHW shapes whose channel counts ``block`` divides
    (ConvertLayout itself leaves an ungrouped one that it does not divide in NCHW)."""
    try:
        c = int(call.args[0].ty.shape.values[1])
        o, i = (int(d) for d in call.args[1].ty.shape.values[:2])
    except (TypeError, ValueError, AttributeError, IndexError):
        return False
    g = int(call.attrs.groups)
    plain = call.attrs.data_layout == "NCHW" and call.attrs.kernel_layout == "OIHW"
    return plain and (g == 1 or (g == c == o and i == 1 and c % block == 0))


def lift_scalar_elementwise(mod):
    """``mod`` with each ``call_tir`` of an element-wise PrimFunc of one tensor and a 0-d operand
    (``max(x, lo)``: TVM's ONNX importer writes a Clip, ReLU6 included, as two of them) written as
    the Relax operator it computes, and each float Relax ``clip`` with constant bounds (a
    HardSigmoid imports as one) as a maximum and a minimum. ConvertLayout carries those operators
    in any layout but neither a ``call_tir`` nor a clip: left as they are, every ReLU6 or HardSwish
    of a blocked graph cost two layout transforms and split the convolution's fused epilogue."""
    import tvm
    from tvm import relax

    ops = {tvm.tirx.Max: relax.op.maximum, tvm.tirx.Min: relax.op.minimum, tvm.tirx.Add: relax.op.add,
           tvm.tirx.Sub: relax.op.subtract, tvm.tirx.Mul: relax.op.multiply, tvm.tirx.Div: relax.op.divide}

    @relax.expr_functor.mutator
    class _Lift(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", "") == "relax.clip":
                return _clip_as_bounds(call)
            if getattr(call.op, "name", "") != "relax.call_tir" or not isinstance(call.args[0], tvm.ir.GlobalVar):
                return call
            op = _scalar_elementwise(mod[call.args[0]], ops) if call.args[0] in mod.functions else None
            args = list(call.args[1].fields) if isinstance(call.args[1], relax.Tuple) else None
            if op is None or args is None or len(args) != 2:
                return call
            return op(*args)

    out = mod.clone()  # the caller's module stays as it was
    for gv, fn in mod.functions.items():
        if isinstance(fn, relax.Function):
            out[gv] = _Lift().visit_expr(fn)
    return relax.transform.DeadCodeElimination()(out)


def _clip_as_bounds(call):
    """``clip(x, lo, hi)`` (a HardSigmoid or HardSwish imports as one) as ``minimum(maximum(x, lo),
    hi)`` with 0-d constant bounds: Relax's clip has no layout rule, maximum and minimum do."""
    from tvm import relax

    try:
        dtype = str(call.args[0].ty.dtype)
        # a bound is an IntImm/FloatImm in this TVM, a PrimValue around one in others
        lo, hi = (float(getattr(b.value, "value", b.value)) for b in call.args[1:3])
    except (AttributeError, TypeError, ValueError):  # bounds that are not constants: leave it
        return call
    if not dtype.startswith(("float", "bfloat")):  # an integer clip has no layout to follow
        return call
    return relax.op.minimum(relax.op.maximum(call.args[0], relax.const(lo, dtype)), relax.const(hi, dtype))


def _scalar_elementwise(func, ops: dict):
    """The Relax operator of ``ops`` that ``func`` computes when it is ``out[i] = op(a[i], s[()])``
    over all of ``a``'s shape, the tensor first as the call passes it, else None."""
    import tvm
    from tvm.s_tir import Schedule

    from ..workloads.prim import blocks

    if not isinstance(func, tvm.tirx.PrimFunc) or len(func.params) != 3:
        return None
    bufs = list(func.params)  # a PrimFunc's parameters are its buffers in this TVM
    try:
        found = blocks(Schedule(tvm.IRModule({"main": func.with_attr("global_symbol", "main")})))
    except Exception:  # not a schedulable function: leave it as it is
        return None
    if len(found) != 1 or not isinstance(found[0].body, tvm.tirx.BufferStore):
        return None
    store, value = found[0].body, found[0].body.value
    op = ops.get(type(value))
    loads = [value.a, value.b] if op is not None else []
    if not all(type(x).__name__ in ("BufferLoad", "TensorLoad") for x in loads) or not store.buffer.same_as(bufs[2]):
        return None
    src = {id(x): x.source if hasattr(x, "source") else x.buffer for x in loads}  # TVM 0.27 calls it a TensorLoad's source
    full = [x for x in loads if src[id(x)].same_as(bufs[0]) and list(bufs[0].shape) == list(bufs[2].shape)
            and all(a.same_as(b) for a, b in zip(x.indices, store.indices)) and len(x.indices) == len(store.indices)]
    scalar = [x for x in loads if src[id(x)].same_as(bufs[1]) and len(bufs[1].shape) == 0]
    if len(full) != 1 or len(scalar) != 1 or loads[0] is not full[0]:  # the call's operand order: tensor first
        return None
    return op


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


def _convolutions(mod) -> list[tuple[int, int, int, int]]:
    """(input channels, output channels, groups, output pixels) of every conv2d of ``mod``, groups
    1 for a depthwise one that blocks (:func:`_blockable`); one that is not a static NCHW/OIHW
    convolution counts with groups 0, so ``auto`` leaves the model NCHW."""
    out = []
    for c in _calls(mod):
        if c.op.name != "relax.nn.conv2d":
            continue
        try:
            data = [int(d) for d in c.args[0].ty.shape.values]
            weight = [int(d) for d in c.args[1].ty.shape.values]
            result = [int(d) for d in c.ty.shape.values]
            ok = c.attrs.data_layout == "NCHW" and c.attrs.kernel_layout == "OIHW"
            g = int(c.attrs.groups)
            depthwise = g != 1 and g == data[1] == weight[0] and weight[1] == 1
            out.append((data[1], weight[0], 1 if depthwise else g, result[2] * result[3]) if ok else (1, 1, 0, 0))
        except (TypeError, ValueError, AttributeError):
            out.append((1, 1, 0, 0))  # a dynamic or unknown shape: not something to block blindly
    return out
