"""Fast math on a CPU: ``erf``, ``exp``, ``tanh`` and ``sigmoid`` as vectorisable polynomials, ``pow``
with a small constant exponent as multiplications.

TVM's LLVM target lowers ``T.erf`` to one call of libm's ``erff`` per element and ``T.exp``
(hence ``T.tanh`` and ``T.sigmoid``, which it spells with ``exp``) to ``expf``: a GELU, softmax or
tanh epilogue stays scalar however the loop is vectorised, and a GEMM + GELU task costs several
times a GEMM + bias of the same FLOPs. topi has vectorisable float32 versions (``fast_erf``,
``fast_exp``, ``fast_tanh``: clamped polynomials and rational functions); :func:`rewrite` puts
their expressions in place of those calls in a TIR module. ``sqrt`` and ``rsqrt`` need nothing:
LLVM already emits packed instructions for them.

**Where the rewrite happens, and why there.** A task's PrimFunc keeps the exact ``T.erf``: its
TVMScript, structural hash and key are what the model's fused function is, so MetaSchedule's
database matches it when the model is compiled, and the float64 reference (:mod:`.prim`, the
same module with every float32 widened) computes the exact function in float64, not the polynomial
(whose error the output check then could not see). The rewrite is applied to the *scheduled*
module just before ``tvm.compile``: by the builder to every candidate of a task that uses fast
math (:mod:`spatialtune.measure.builder`) and by :func:`spatialtune.models.compile.compile_model` to
the same functions of the model, so what is timed is what is deployed. Rewriting in Relax
(``relax.transform.FastMathTransform``) before extraction would change the tasks themselves:
their reference would compute the polynomial in float64 and prove nothing about its error.

**On only where the check passes.** :func:`probe` builds a task's untuned module with the
rewrite, runs it on the inputs a measuring worker draws, and checks it against the exact float64
reference with the tuner's own tolerances (:mod:`.check`). A task that fails falls back to exact
math, with the reason kept in :attr:`PrimTask.exact_math` (and the space file's ``exact_math``).
Only float32 calls are rewritten; float64 and float16 ones keep TVM's lowering.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

FAST_OPS = ("erf", "exp", "tanh", "sigmoid", "pow")
"""The TIR intrinsics :func:`rewrite` replaces (their float32 calls; ``pow`` only with a constant
exponent of 1/2, 1, 2, 3 or 4, see :func:`_small_power`)."""


def _small_power(exponent) -> Callable | None:
    """``x -> x ** exponent`` as multiplications (or a square root) for a constant exponent that
    has one, else None. TVM lowers ``pow`` to libm's scalar ``powf`` per element whatever the
    exponent; a tanh-form GELU (PyTorch's ``approximate="tanh"``, exported as ``Pow(x, 3)``) then
    spends more time in ``powf`` than in its matmul. ``x * x * x`` is within two roundings of
    the exact cube, and vectorises."""
    from tvm import tirx

    if not isinstance(exponent, tirx.FloatImm):
        return None
    return {0.5: tirx.sqrt, 1.0: lambda x: x, 2.0: lambda x: x * x, 3.0: lambda x: x * x * x,
            4.0: lambda x: (x * x) * (x * x)}.get(float(exponent.value))

EXACT_ATTR = "spatialtune.exact_math"
"""A PrimFunc attribute that keeps :func:`rewrite` off that function (a task that fell back)."""


@functools.lru_cache(maxsize=None)
def _templates() -> dict[str, tuple[object, object]]:
    """op name -> (var, expression of var): topi's fast float32 bodies with the loaded element
    replaced by a variable, ready to be bound to the argument of a call."""
    import tvm
    import tvm_ffi
    from tvm import te, tirx, topi

    out = {}
    for name, fn in (("erf", topi.fast_erf), ("exp", topi.fast_exp), ("tanh", topi.fast_tanh)):
        x = tirx.Var("x", "float32")
        a = te.placeholder((1,), "float32", name="a")

        def load(c, x=x):
            return x if isinstance(c.op, tvm.ir.Op) and c.op.name == "te.tensor_load" else c

        out[name] = (x, tvm_ffi.structural_map(fn(a).op.body[0], ((tvm.ir.Call, load),)))
    # topi's fast_tanh in this TVM does not clamp its input: its rational function leaves [-1, 1]
    # past |x| of about 9 (off by 0.04 at 20). tanh is within float32 rounding of +-1 there.
    x, body = out["tanh"]
    c = tirx.Var("c", "float32")
    clamped = tvm_ffi.structural_map(body, ((tirx.Var, lambda y: c if y.same_as(x) else y),))
    out["tanh"] = (x, tirx.Let(c, tirx.max(tirx.min(x, tirx.const(9.0, "float32")), tirx.const(-9.0, "float32")),
                              clamped))
    # sigmoid(x) = 1 / (1 + exp(-x)), with exp the fast one (TVM lowers sigmoid through expf)
    x = tirx.Var("x", "float32")
    ex, body = out["exp"]
    one = tirx.const(1.0, "float32")
    out["sigmoid"] = (x, one / (one + tirx.Let(ex, -x, body)))
    return out


def _fast_call(counts: dict[str, int]) -> Callable:
    import tvm
    import tvm_ffi
    from tvm import tirx

    ops = {f"tirx.{n}": n for n in FAST_OPS}

    def visit(c):
        name = ops.get(c.op.name) if isinstance(c.op, tvm.ir.Op) else None
        if name is None or str(c.ty.dtype) != "float32":
            return c
        if name == "pow":
            power = _small_power(c.args[1])
            if power is None:
                return c
            v = tirx.Var("v", "float32")
            counts[name] = counts.get(name, 0) + 1
            return tirx.Let(v, c.args[0], power(v))
        x, body = _templates()[name]
        v = tirx.Var("v", "float32")
        counts[name] = counts.get(name, 0) + 1
        # A fresh variable per call, bound once: the argument (a GEMM's accumulator times a
        # constant) is computed once however often the polynomial reads it.
        return tirx.Let(v, c.args[0], tvm_ffi.structural_map(body, ((tirx.Var, lambda y: v if y.same_as(x) else y),)))

    return visit


def rewrite(mod, skip: Callable[[str, object], bool] | None = None):
    """(``mod`` with every float32 call of :data:`FAST_OPS` replaced by its fast expression,
    {op: calls replaced}). PrimFuncs with the :data:`EXACT_ATTR` attribute, or for which
    ``skip(name, func)`` is true, are left as they are; other functions are untouched."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    counts: dict[str, int] = {}
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    visit = _fast_call(counts)
    for gv, f in mod.functions.items():
        if not isinstance(f, tirx.PrimFunc) or (f.attrs is not None and EXACT_ATTR in f.attrs):
            continue
        if skip is not None and skip(gv.name_hint, f):
            continue
        new = tvm_ffi.structural_map(f, ((tvm.ir.Call, visit),))
        if not new.same_as(f):
            out[gv] = new
    return out, counts


def approximable(mod) -> dict[str, int]:
    """{op: float32 calls} of :data:`FAST_OPS` in ``mod``: what :func:`rewrite` would replace."""
    return rewrite(mod)[1]


def probe(task, seed: int = 0) -> str | None:
    """None when ``task`` (a :class:`~.prim.PrimTask`) built with fast math passes the output
    check against its exact float64 reference on a measuring worker's inputs; else the check's
    one-line complaint. Builds the untuned module for this CPU (the polynomial's numerics do not
    depend on the schedule; every tuned candidate is checked again when it is measured)."""
    import tvm

    from .check import check_output
    from .prim import reference_outputs

    fast, _ = rewrite(task.ir_module())
    lib = tvm.compile(fast, target=tvm.target.Target({"kind": "llvm"}))
    xs = task.random_inputs(np.random.default_rng(seed))
    dev = tvm.cpu(0)
    outs = [tvm.runtime.tensor(o, dev) for o in task.poisoned_outputs()]
    lib["main"](*[tvm.runtime.tensor(x, dev) for x in xs], *outs)
    refs = reference_outputs(task, xs)
    for i, (o, r) in enumerate(zip(outs, refs)):
        _, wrong = check_output(o.numpy(), r, task.dtype)
        if wrong:
            return f"fast math fails the output check (output {i}: {wrong})"
    return None
