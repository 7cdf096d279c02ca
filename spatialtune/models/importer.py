"""Models in: an ONNX file through TVM Relax, and the tuning tasks MetaSchedule extracts from it.

:func:`load_onnx` reads the file (weights bound as constants, every input given a static shape)
into a Relax module; :func:`fuse` runs the legalize-and-fuse pipeline, the same passes
``compile_relax`` runs before it applies a MetaSchedule database, so the PrimFuncs extracted here
are structurally the ones the compiled model calls; :func:`extract_workloads` turns MetaSchedule's
``extract_tasks`` into :class:`~spatialtune.workloads.spec.Workload` objects (the fused PrimFunc's
TVMScript, its weight, the model, a readable name).

PyTorch models come in through ``torch.onnx.export`` (see docs/models.md); torch is not a
dependency.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ConfigError, SpecError
from ..workloads.prim import PrimTask, prim_task
from .layout import AUTO, layout_name, parse_layout, resolve
from .onnx_fold import fold_batch_norms
from ..workloads.spec import Workload

log = logging.getLogger(__name__)

EXTRACT_TARGET = {"kind": "llvm"}
"""The target tasks are extracted for. Legalization does not depend on the CPU model or its core
count, so a model's space is the same whatever machine wrote it (like an operator space)."""


@dataclass
class ImportedModel:
    name: str  # the file's stem
    path: str
    hash: str  # sha256 of the file, 16 hex digits
    inputs: list[tuple[str, tuple[int, ...], str]]  # (name, static shape, numpy dtype) of each graph input
    outputs: list[str]
    relax_mod: Any = field(repr=False)  # tvm.IRModule from from_onnx, weights as constants
    layout: str = "nchw"  # of its convolutions (models.layout); another layout is another name
    # with weights as inputs (load_onnx's params_from): (name, value) of each weight ``main`` takes
    # after the inputs, in order; ``main_transform_params`` turns them into what ``main`` runs on
    params: list[tuple[str, Any]] = field(default_factory=list, repr=False)


def parse_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``["x=1,3,224,224", ...]`` -> ``{"x": (1, 3, 224, 224)}``; ConfigError naming a bad item."""
    out: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, eq, dims = item.partition("=")
        try:
            shape = tuple(int(d) for d in dims.split(",")) if eq and dims.strip() else ()
        except ValueError:
            shape = ()
        if not name.strip() or not shape or any(d < 1 for d in shape):
            raise ConfigError(f"--shape {item!r}: expected NAME=D1,D2,... with positive integers, e.g. x=1,3,224,224")
        out[name.strip()] = shape
    return out


def _read(path: Path):
    import onnx

    if not path.is_file():
        raise SpecError(f"{path}: no such ONNX file")
    data = path.read_bytes()
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:
        raise SpecError(f"{path}: not an ONNX model ({type(e).__name__})") from None
    if not model.graph.node:
        raise SpecError(f"{path}: not an ONNX model (no graph nodes)")
    return model, hashlib.sha256(data).hexdigest()[:16]


def load_onnx(path: str | Path, shapes: Mapping[str, Sequence[int]] | None = None,
              layout: str | None = AUTO, *, params_from: int | None = None) -> ImportedModel:
    """Import ``path`` through ``tvm.relax.frontend.onnx.from_onnx``. ``shapes`` gives (or
    overrides) input shapes by input name; every dimension must end up static. ``layout``:
    ``auto`` (the default), ``nchw`` or ``NCHW<b>c`` for blocked convolutions (:mod:`.layout`; a
    blocked model's name ends in ``-NCHW<b>c``, its tasks are others). SpecError for a file that is not ONNX,
    a dynamic dimension left, or what the importer cannot take.

    ``params_from``: weights of at least that many elements stay inputs of ``main`` instead of
    constants compiled into the module (:func:`lift_params`), so that variants compiled from the
    same model share one copy of them."""
    from onnx import helper

    path = Path(path)
    model, digest = _read(path)
    fold_batch_norms(model)  # as ONNX Runtime's optimizer does (the file's digest stays the model's identity)
    shapes = {k: tuple(int(d) for d in v) for k, v in (shapes or {}).items()}
    inits = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in inits]
    unknown = sorted(set(shapes) - {i.name for i in graph_inputs})
    if unknown:
        raise ConfigError(f"--shape {unknown[0]}: {path.name} has no input of that name "
                          f"(inputs: {', '.join(i.name for i in graph_inputs)})")
    inputs = []
    for i in graph_inputs:
        t = i.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim)
        shape = shapes.get(i.name, dims)
        if t.HasField("shape") and len(shape) != len(dims):
            raise ConfigError(f"--shape {i.name}: {path.name} declares {len(dims)} dimensions ({_dims(t)}), "
                              f"--shape gives {len(shape)}")
        if not shape and not t.HasField("shape"):
            raise SpecError(f"{path}: input {i.name} has no shape: give --shape {i.name}=D1,D2,...")
        if any(d < 1 for d in shape):
            raise SpecError(f"{path}: input {i.name} has a dynamic dimension ({_dims(t)}): give --shape "
                            f"{i.name}=D1,D2,...")
        inputs.append((i.name, tuple(shape), str(helper.tensor_dtype_to_np_dtype(t.elem_type))))
    from tvm.relax.frontend.onnx import from_onnx

    try:
        mod = from_onnx(model, shape_dict={n: list(s) for n, s, _ in inputs} or None,
                        dtype_dict={n: dt for n, _, dt in inputs} or "float32", keep_params_in_input=params_from is not None)
    except Exception as e:
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        raise SpecError(f"{path}: TVM's ONNX importer failed: {lines[-1][:300] if lines else type(e).__name__}") \
            from None
    parse_layout(layout)  # a bad name is a ConfigError, not a SpecError of the file
    try:
        mod, block, winograd = resolve(mod, layout)
    except Exception as e:
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise SpecError(f"{path}: the {layout} layout does not apply: "
                        f"{lines[-1][:300] if lines else type(e).__name__}") from None
    params = []
    if params_from is not None:
        mod, params = lift_params(mod, params_from)
    form = layout_name(block, winograd)  # a model's name says how its convolutions compute
    return ImportedModel(name=path.stem if block is None else f"{path.stem}-{form.replace('+', '-')}", path=str(path),
                         hash=digest, inputs=inputs, outputs=[o.name for o in model.graph.output], relax_mod=mod,
                         layout=form, params=params)


def _dims(t) -> str:
    return "x".join(d.dim_param or str(d.dim_value) if d.dim_param or d.dim_value else "?" for d in t.shape.dim)


def lift_params(mod, min_elements: int) -> tuple[object, list[tuple[str, Any]]]:
    """``mod`` (imported with its weights as inputs) with the weights under ``min_elements``
    elements bound as constants again, and the computations on the others alone (layout and shape
    transforms, which constants would fold at compile time) lifted into ``main_transform_params``
    (Relax's ``LiftTransformParams``). Scalars and small tensors stay constants because the fused
    functions then keep them inline, as the tasks were extracted: the remaining PrimFuncs are
    structurally those of the constant model, and the tuning records still apply. Returns the
    module and the (name, value) of each weight left an input, in ``main``'s order."""
    import numpy as np
    from tvm import relax

    f = mod["main"]
    n_in = int(f.attrs["num_input"])
    named = list(zip([v.name for v in f.params][n_in:], f.attrs["params"]))
    small = {n: v for n, v in named if int(np.prod(v.shape)) < min_elements}
    mod = relax.transform.BindParams("main", small)(mod)
    mod = relax.transform.LiftTransformParams()(mod)
    return mod, [(n, v) for n, v in named if n not in small]


def fuse(mod, target: dict | None = None):
    """The legalize-and-fuse pipeline of ``compile_relax`` (library dispatch, LegalizeOps,
    AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR): its PrimFuncs are the model's tasks."""
    import tvm
    from tvm import relax
    from tvm.relax import pipeline

    tgt = tvm.target.Target(target or EXTRACT_TARGET)
    try:
        dispatch = pipeline.library_dispatch_passes(tgt)
    except (ValueError, AttributeError):
        dispatch = []
    seq = tvm.transform.Sequential([*dispatch, relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FoldConstant(), relax.transform.FuseOps(),
                                    relax.transform.FuseTIR()])
    with tgt, tvm.transform.PassContext(opt_level=3):
        return seq(mod)


def extract_workloads(model: ImportedModel, target: dict | None = None, fast_math: bool = True) -> list[Workload]:
    """The model's tuning tasks as workloads, heaviest (weight x FLOPs) first.

    A task with float32 erf/exp/tanh/sigmoid is probed once here (:func:`decide_math`): it builds
    with their vectorisable approximations on a CPU only when that passes the output check;
    ``fast_math=False`` keeps every task exact."""
    import tvm
    from tvm.s_tir.meta_schedule.relax_integration import extract_tasks

    fused = fuse(model.relax_mod, target)
    tasks = extract_tasks(fused, tvm.target.Target(target or EXTRACT_TARGET))
    consts = constant_args(fused)
    out = []
    for t in tasks:
        script = t.dispatched[0].script()
        try:
            task = prim_task(script, t.task_name)
        except SpecError as e:
            raise SpecError(f"{model.path}: task {t.task_name}: {e}") from None
        task = decide_math(task, fast_math, where=f"{model.name}: {t.task_name}")
        if t.task_name in consts:
            task = dataclasses.replace(task, weights=consts[t.task_name])
        out.append(Workload.from_prim(task, name=t.task_name, model=model.name, weight=int(t.weight)))
    out.sort(key=lambda w: (-w.weight * w.flops, w.name))
    log.info("%s: %d tasks", model.name, len(out))
    return out


def constant_args(mod) -> dict[str, tuple[int, ...]]:
    """{PrimFunc name: the indices of its inputs that are constants (the model's weights) at every
    ``call_tir`` of it in ``mod``'s Relax functions}: what ``cold`` keeps out of the caches when it
    times the task (:attr:`PrimTask.weights`)."""
    import tvm
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")
    out: dict[str, set[int]] = {}
    for fn in mod.functions.values():
        if not isinstance(fn, relax.Function) or not isinstance(fn.body, relax.SeqExpr):
            continue
        for block in fn.body.blocks:
            for b in block.bindings:
                v = b.value
                if not (isinstance(v, relax.Call) and v.op == call_tir):
                    continue
                args = v.args[1].fields if isinstance(v.args[1], relax.Tuple) else [v.args[1]]
                here = {i for i, a in enumerate(args) if isinstance(a, tvm.ir.expr.Constant)}
                name = v.args[0].name_hint
                out[name] = out[name] & here if name in out else here
    return {k: tuple(sorted(v)) for k, v in out.items()}


def decide_math(task: PrimTask, fast_math: bool = True, where: str = "") -> PrimTask:
    """``task`` with :attr:`PrimTask.exact_math` set when it has calls fast math would replace and
    either ``fast_math`` is off or the fast build fails the output check (:func:`.fastmath.probe`,
    logged); unchanged otherwise."""
    from ..workloads.fastmath import approximable, probe

    calls = approximable(task.ir_module())
    if not calls:
        return task
    ops = ", ".join(sorted(calls))
    why = "fast math turned off" if not fast_math else probe(task)
    if why:
        log.warning("%s: exact %s (%s)", where or task.key, ops, why)
        return dataclasses.replace(task, exact_math=why)
    log.info("%s: fast %s (passes the output check)", where or task.key, ops)
    return task


def merge_tasks(per_model: Sequence[Sequence[Workload]]) -> list[Workload]:
    """The tasks of several models as one space: a task two models share is listed once, with the
    weights added and both models named; names that clash are prefixed with their model's."""
    by_key: dict[str, Workload] = {}
    for ws in per_model:
        for w in ws:
            if w.key in by_key:
                o = by_key[w.key]
                models = ", ".join(dict.fromkeys([*o.model.split(", "), w.model]))
                prim = o.prim
                if o.prim.weights is not None and w.prim.weights is not None:  # a weight in both models
                    prim = dataclasses.replace(prim, weights=tuple(sorted(set(o.prim.weights) & set(w.prim.weights))))
                elif w.prim.weights is None:
                    prim = dataclasses.replace(prim, weights=None)
                by_key[w.key] = Workload.from_prim(prim, name=o.name, model=models, weight=o.weight + w.weight)
            else:
                by_key[w.key] = w
    out: list[Workload] = []
    names = [w.name for w in by_key.values()]
    for w in by_key.values():
        if names.count(w.name) > 1:
            w = Workload.from_prim(w.prim, name=f"{w.model.split(', ')[0]}/{w.name}", model=w.model,
                                   weight=w.weight)
        out.append(w)
    return out


def space_from_onnx(paths: Sequence[str | Path], shapes: Mapping[str, Sequence[int]] | None = None,
                    name: str | None = None, fast_math: bool = True,
                    layout: str | None = AUTO) -> tuple[str, list[Workload]]:
    """(the search-space file's text, its workloads) for the tasks of the models at ``paths``
    (their convolutions in ``layout``, see :func:`load_onnx`)."""
    from ..workloads.spacefile import format_space

    if not paths:
        raise ConfigError("no model given")
    models = [load_onnx(p, shapes, layout) for p in paths]
    workloads = merge_tasks([extract_workloads(m, fast_math=fast_math) for m in models])
    desc = "Tuning tasks of " + ", ".join(
        f"{m.name} ({Path(m.path).name} {m.hash}; inputs " + ", ".join(f"{n}={','.join(map(str, s))}"
                                                                          for n, s, _ in m.inputs) + ")"
        for m in models) + ", extracted by spatialtune workloads --from-onnx"
    return format_space(name or "+".join(m.name for m in models), desc, workloads), workloads
