"""Workloads that are PrimFuncs: the fused tasks MetaSchedule extracts from a model.

An operator workload (:mod:`.ops`) has a hand-written TE definition and a numpy reference; a
PrimFunc from a model has neither. What it has is its TVMScript, the IRModule holding ``main``
that Relax's legalize-and-fuse pipeline produced (a matmul with its bias, activation and residual
add fused in), and :class:`PrimTask` keeps that text with what a measuring worker needs to know
without parsing it (a GPU host's runtime-only TVM has no parser): every parameter buffer's shape
and dtype, how many of them are outputs, the FLOPs.

**Identity.** A task is keyed by its readable name plus the structural hash of its IRModule
(``fused_matmul_add_relu_80b0c7a1e1d3f42c``): the same computation extracted from two models has
the same key and is tuned once. The readable part is TVM's task name without the numbering it adds
to tell tasks of one model apart (``fused_matmul1_add1`` is ``fused_matmul_add``).

**Outputs.** Relax calls a PrimFunc in destination-passing style: the output buffers are the
trailing parameters. They are found as the parameters some block writes, and checked to trail.

**Reference.** There is no numpy reference: the reference is the untuned module itself, compiled
for the CPU with every float16/float32 in it (buffers, intermediates, constants, casts) rewritten
to float64, and run on the same inputs cast to float64. Integer and boolean buffers keep their
dtype (their results must match exactly). On a host without TVM's compiler (a GPU bundle's
runtime-only TVM), the reference is a library built on the CPU host when the bundle was built
(:func:`build_reference`) and loaded by path.
"""

from __future__ import annotations

import functools

import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import SpecError

_NUMBERING = re.compile(r"(?<=[a-z])\d+(?=_|$)")
_NARROW_FLOAT = re.compile(r"\bfloat(16|32)\b")
_FLOATS = {"float16": "fp16", "float32": "fp32", "float64": "fp64"}


def task_base_name(task_name: str) -> str:
    """TVM's task name without the numbers it appends per model (``fused_conv2d1_add_relu`` ->
    ``fused_conv2d_add_relu``), so the key of one computation reads the same in every model."""
    return _NUMBERING.sub("", task_name) or "prim"


@dataclass(frozen=True)
class PrimTask:
    script: str  # TVMScript of the IRModule whose "main" is the task's PrimFunc
    hash: str  # structural hash of that IRModule, 16 hex digits
    task: str  # readable name: TVM's task name without its numbering
    args: tuple[tuple[tuple[int, ...], str], ...]  # (shape, dtype) of every parameter, in order
    n_outputs: int  # the trailing parameters are written: the outputs
    flops: int
    # why this task builds with exact math on a CPU ("": its float32 erf/exp/tanh/sigmoid, if any,
    # build as vectorisable approximations; see .fastmath); not part of the key, which says what
    # is computed, not how it is built
    exact_math: str = ""
    # Which inputs are the model's weights (constants at every call of the task): a measurement
    # under ``cold`` brings the others back into the caches after each eviction, as the layers
    # before the task leave its activations there. None: not known (every input starts cold).
    # Not part of the key either: it says how the model feeds the task, not what it computes.
    weights: tuple[int, ...] | None = None

    @property
    def key(self) -> str:
        return f"{self.task}_{self.hash}"

    @property
    def inputs(self) -> list[tuple[tuple[int, ...], str]]:
        return list(self.args[: len(self.args) - self.n_outputs])

    @property
    def outputs(self) -> list[tuple[tuple[int, ...], str]]:
        return list(self.args[len(self.args) - self.n_outputs:])

    @property
    def dtype(self) -> str:
        """The tolerance class its outputs are checked with (see :mod:`.check`): ``fp16`` when any
        buffer is float16, else the output's float type, else ``int`` (exact)."""
        dts = {dt for _, dt in self.args}
        if "float16" in dts:
            return "fp16"
        out = {dt for _, dt in self.outputs}
        for dt in ("float32", "float64"):
            if dt in out:
                return _FLOATS[dt]
        return "int"

    def to_dict(self) -> dict[str, Any]:
        d = {"script": self.script, "hash": self.hash, "task": self.task,
             "args": [[list(s), dt] for s, dt in self.args], "n_outputs": self.n_outputs, "flops": self.flops}
        return (d | ({"exact_math": self.exact_math} if self.exact_math else {})
                | ({"weights": list(self.weights)} if self.weights is not None else {}))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PrimTask":
        """Trusts what it is given: no TVM needed. :func:`prim_task` is the checked way in."""
        try:
            return cls(script=str(d["script"]), hash=str(d["hash"]), task=str(d["task"]),
                       args=tuple((tuple(int(x) for x in s), str(dt)) for s, dt in d["args"]),
                       n_outputs=int(d["n_outputs"]), flops=int(d["flops"]), exact_math=str(d.get("exact_math", "")),
                       weights=None if d.get("weights") is None else tuple(int(i) for i in d["weights"]))
        except (KeyError, TypeError, ValueError) as e:
            raise SpecError(f"not a PrimFunc workload ({type(e).__name__}: {e})") from None

    def ir_module(self):
        return parse_module(self.script)

    # -- inputs, outputs, reference ------------------------------------------------------------

    @property
    def activations(self) -> list[int]:
        """The inputs that are not weights, when the weights are known; else none."""
        return [] if self.weights is None else [i for i in range(len(self.inputs)) if i not in self.weights]

    def random_inputs(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Floats uniform in [-1, 1]; integers and booleans zero, since an integer input of a fused
        task is usually an index (a gather's, an embedding's) and zero is always in range."""
        out = []
        for shape, dt in self.inputs:
            if dt.startswith("float"):
                out.append(rng.uniform(-1.0, 1.0, size=shape).astype(dt))
            else:
                out.append(np.zeros(shape, dtype=dt))
        return out

    def poisoned_outputs(self) -> list[np.ndarray]:
        """Output arrays to hand the kernel: NaN for floats, the most negative value for integers,
        so an element the kernel never writes cannot pass the check."""
        return [np.full(s, np.nan if dt.startswith("float") else np.iinfo(dt).min if dt != "bool" else True, dtype=dt)
                for s, dt in self.outputs]


def parse_module(script: str):
    """The IRModule of a TVMScript text (imports TVM's parser). A copy of the one parse per text:
    parsing costs about 0.1 s (TVMScript walks the caller's stack), and a job asks for a task's
    module at every search, replay and build of it (225 parses in one quick bench-model run)."""
    return _parsed(script).clone()


@functools.lru_cache(maxsize=256)
def _parsed(script: str):
    import tvm

    try:
        mod = tvm.script.from_source(script)
    except Exception as e:
        first = str(e).strip().splitlines()
        raise SpecError(f"script does not parse: {first[-1] if first else type(e).__name__}") from None
    if not isinstance(mod, tvm.IRModule):
        mod = tvm.IRModule({"main": mod})
    names = [gv.name_hint for gv in mod.get_global_vars()]
    if names != ["main"]:
        raise SpecError(f"script must hold exactly one function, main (has: {', '.join(names)})")
    return mod


def prim_task(script: str, task_name: str) -> PrimTask:
    """Check a task's TVMScript and read what a worker needs from it. SpecError when it does not
    parse, has a dynamic shape, or its outputs are not its trailing parameters."""
    import tvm

    from .schedule import mod_hash

    mod = parse_module(script)
    func = mod["main"]
    args = []
    for p in func.params:
        if not hasattr(p, "shape"):
            raise SpecError(f"{task_name}: parameter {p} is a scalar, not a buffer: not a tensor task")
        shape = []
        for d in p.shape:
            if not isinstance(d, tvm.tirx.IntImm):
                raise SpecError(f"{task_name}: parameter {p.name} has a dynamic shape ({d}): give the model's input "
                                "shapes (--shape NAME=1,3,224,224)")
            shape.append(int(d))
        dt = str(p.dtype)
        if dt not in ("float16", "float32", "float64", "bool") and not re.fullmatch(r"u?int(8|16|32|64)", dt):
            raise SpecError(f"{task_name}: parameter {p.name} has dtype {dt}, which spatialtune cannot check")
        args.append((tuple(shape), dt))
    written = _written_params(mod)
    n_out = len(written)
    if n_out == 0 or written != set(range(len(args) - n_out, len(args))):
        raise SpecError(f"{task_name}: its outputs are not its trailing parameters (written: {sorted(written)} of "
                        f"{len(args)}): not a Relax task")
    try:
        from tvm.s_tir.analysis import estimate_tir_flops

        flops = int(estimate_tir_flops(mod))
    except Exception:  # a construct the estimator does not know: the task still tunes, without GFLOP/s
        flops = 0
    return PrimTask(script=script, hash=mod_hash(mod), task=task_base_name(task_name), args=tuple(args),
                    n_outputs=n_out, flops=flops)


def blocks(sch) -> list:
    """Every block of ``sch``'s ``main`` below its root (the SBlock statements, any nesting)."""
    out, todo = [], [sch.get_sblock("root")]
    while todo:
        for b in sch.get_child_blocks(todo.pop()):
            todo.append(b)
            out.append(sch.get(b))
    return out


def _written_params(mod) -> set[int]:
    """Indices of the parameters some block of ``main`` writes (its declared write regions)."""
    from tvm.s_tir import Schedule

    sch = Schedule(mod)
    params = list(sch.mod["main"].params)
    hit: set[int] = set()
    for blk in blocks(sch):
        for region in blk.writes:
            hit |= {i for i, p in enumerate(params) if region.source.same_as(p)}
    return hit


# ---------------------------------------------------------------- the float64 reference


def float64_script(task: PrimTask) -> str:
    """The task's module printed with every dtype explicit, float16/float32 rewritten to float64.

    TVMScript leaves a buffer's dtype out when it is the printer's default (float32 for an
    intermediate ``sblock_alloc_buffer``); printed with no default, every float32 in the module is
    spelled out, so the rewrite reaches intermediates, constants and casts alike.
    """
    import tvm
    from tvm.runtime.script_printer import PrinterConfig

    printer = tvm.get_global_func("node.TVMScriptPrinterScript")
    return _NARROW_FLOAT.sub("float64", printer(task.ir_module(), PrinterConfig(buffer_dtype="void")))


def float64_args(task: PrimTask) -> list[tuple[tuple[int, ...], str]]:
    return [(s, "float64" if dt.startswith("float") else dt) for s, dt in task.args]


def build_reference(task: PrimTask, path: str | None = None):
    """The float64 reference compiled for this CPU (``path``: exported there for a host without a
    compiler, for generic x86-64/aarch64 so any CPU of the family runs it). Returns the module."""
    import tvm

    mod = parse_module(float64_script(task))
    lib = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    if path is not None:
        lib.export_library(path)
    return lib


_references: dict[tuple[str, str], Any] = {}


def reference_outputs(task: PrimTask, xs: list[np.ndarray], library: str | None = None) -> list[np.ndarray]:
    """The float64 reference's outputs for inputs ``xs``. The compiled reference is kept per task
    for the life of the process (a measuring worker checks many candidates of one task)."""
    import tvm

    key = (task.key, library or "")
    if key not in _references:
        if library:
            _references[key] = tvm.runtime.load_module(library)
        else:
            _references[key] = build_reference(task)
    mod = _references[key]
    dev = tvm.cpu(0)
    wide = float64_args(task)
    args = [tvm.runtime.tensor(x.astype(dt), dev) for x, (_, dt) in zip(xs, wide)]
    outs = [tvm.runtime.tensor(np.zeros(s, dtype=dt), dev) for s, dt in wide[len(xs):]]
    mod["main"](*args, *outs)
    return [o.numpy() for o in outs]
