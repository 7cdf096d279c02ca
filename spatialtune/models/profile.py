"""Where a model's time goes at a share: each task's weight x kernel time next to ONNX Runtime's
time for the same operators, and the time outside the tuned kernels (``spatialtune model --profile``).

TVM side: a task's time is its weight (calls per inference) x its tuned kernel's median at the
share, from the database, the numbers the tuner optimized; *outside tuned kernels* is the
share-tuned end-to-end latency minus their sum: the Relax VM, allocations, copies, and the tasks
that had no config (they run untuned). It can come out negative: a kernel timed alone, its inputs
fresh each call, can be slower than inside the model, whose data is already in the caches.

ONNX Runtime side: its profiler (``SessionOptions.enable_profiling``) gives each node of its
optimized graph a time per run (:func:`spatialtune.models.in_worker.profile_onnxruntime`);
*outside* is the nodes that match no task plus its whole run minus its nodes (the executor).

TVM's ONNX importer keeps no record of which ONNX nodes went into a fused function, so nodes are
matched to tasks by operator kind and order (:func:`match_nodes`): the tasks' calls in the order
the compiled model makes them, ONNX Runtime's nodes in the order it ran them, each node given to a
call whose name has one of the node's operators (``fused_matmul_add_relu`` takes MatMul, Gemm,
Add, Relu), never going back, one heavy operator (convolution, matmul) per call; the alignment
that matches the most (heavy operators counting double) wins. ORT's own fusions (a Gemm is MatMul
and Add) match by their heaviest part. A node that matches nothing is outside. Where ORT's profile
gives the nodes' output shapes, the convolutions and matmuls are matched by family and output size
first, whatever their order, and the other nodes as above (:func:`match_nodes`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

HEAVY = {"conv1d", "conv2d", "conv3d", "matmul", "dense"}
"""The operators a fused task is built around; a task's call takes at most one such ORT node."""

_MATMUL = ("matmul", "dense")
_CONV = ("conv1d", "conv2d", "conv3d")
ORT_OPS: dict[str, tuple[str, ...]] = {
    "Conv": _CONV, "FusedConv": _CONV, "NchwcConv": _CONV, "ConvTranspose": _CONV, "QLinearConv": _CONV,
    "MatMul": _MATMUL, "FusedMatMul": _MATMUL, "Gemm": _MATMUL, "FusedGemm": _MATMUL, "MatMulNBits": _MATMUL,
    "MatMulInteger": _MATMUL, "QLinearMatMul": _MATMUL, "Attention": _MATMUL, "MultiHeadAttention": _MATMUL,
    "Add": ("add",), "Sum": ("add",), "Sub": ("subtract",), "Mul": ("multiply",), "Div": ("divide",),
    "Relu": ("relu",), "Sigmoid": ("sigmoid",), "Tanh": ("tanh",), "Erf": ("erf",), "Exp": ("exp",),
    "Sqrt": ("sqrt", "rsqrt"), "Pow": ("power",), "Softmax": ("softmax",), "Clip": ("clip",),
    "Gelu": ("erf", "gelu"), "BiasGelu": ("erf", "gelu"), "FastGelu": ("tanh", "gelu"),
    # ORT fuses x * sigmoid(a x) (SiLU / Swish, EfficientNet's activation) into its QuickGelu
    "QuickGelu": ("sigmoid", "multiply"), "BiasAdd": ("add",), "BiasSoftmax": ("softmax",),
    "SimplifiedLayerNormalization": ("mean", "sqrt", "rsqrt", "power", "norm"),
    "SkipSimplifiedLayerNormalization": ("mean", "sqrt", "rsqrt", "power", "norm"),
    "LayerNormalization": ("layer", "norm", "mean"), "SkipLayerNormalization": ("layer", "norm", "mean"),
    "ReduceMean": ("mean",), "ReduceSum": ("sum",), "ReduceMax": ("max",),
    "Transpose": ("transpose",), "Reshape": ("reshape",), "Flatten": ("reshape",), "Squeeze": ("squeeze", "reshape"),
    "Unsqueeze": ("expand", "reshape"), "Concat": ("concatenate",), "Gather": ("take",), "Slice": ("strided", "slice"),
    "Split": ("split",), "Cast": ("astype",), "Where": ("where",), "MaxPool": ("pool1d", "pool2d", "pool3d"),
    "AveragePool": ("pool1d", "pool2d", "pool3d"), "GlobalAveragePool": ("adaptive", "mean"),
    "BatchNormalization": ("batch", "norm"), "LeakyRelu": ("leakyrelu", "leaky"),
}
"""The TVM operator names an ONNX Runtime node may appear as in a fused task's name (an operator
not listed is its own name in lower case). ORT's NCHWc layout changes (ReorderInput/Output) match
nothing: TVM's kernels need none, so they are ORT's time outside the tasks."""


def task_ops(name: str) -> set[str]:
    """``fused_matmul1_add2_relu`` -> {"matmul", "add", "relu"}: TVM names a fused function after
    its operators, numbered to keep the names unique."""
    parts = name.split("/")[-1].removeprefix("fused_").split("_")
    return {p.rstrip("0123456789") for p in parts if p.rstrip("0123456789")}


def node_ops(op: str) -> tuple[set[str], bool]:
    """(the task operator names an ORT node of type ``op`` may be, whether it is a heavy one)."""
    ops = set(ORT_OPS.get(op, (op.lower(),)))
    return ops, bool(ops & HEAVY)


def _family(ops: set[str]) -> str | None:
    return "conv" if ops & set(_CONV) else "matmul" if ops & set(_MATMUL) else None


def match_nodes(nodes: Sequence[str], calls: Sequence[str], node_sizes: Sequence[int | None] | None = None,
                call_sizes: Sequence[Sequence[int]] | None = None,
                weights: Sequence[float] | None = None) -> list[int | None]:
    """For each ORT node (its operator type), in execution order, the index of the task call it is
    matched to (``calls``: the tasks' names in call order), or None (see the module doc).

    With sizes (each node's output elements, each call's outputs' elements) the heavy nodes are
    matched by what they compute, not by order: the k-th convolution or matmul node with an output
    of N elements to the k-th call of that family with an output of N elements, then those left by
    family in order. The two runtimes need not order independent branches alike (ONNX Runtime ran
    an attention's V projection after the softmax, TVM's model makes it beside Q and K), and an
    alignment kept in order then gave one projection to the attention's matmul. A light node
    (add, erf, ...) goes to the call of the last heavy node before it where that call has the
    node's operator (an epilogue ONNX Runtime left unfused, maybe behind a reshape), the rest in
    order to the calls with no heavy operator. ``weights``: the nodes' times, for the alignments
    in order (:func:`_in_order`)."""
    if node_sizes is None or call_sizes is None:
        return _in_order(nodes, calls, weights)
    kinds = [node_ops(op) for op in nodes]
    cops = [task_ops(c) for c in calls]
    family = [_family(c) for c in cops]
    out: list[int | None] = [None] * len(nodes)
    taken: set[int] = set()
    for by_size in (True, False):
        for i, (ops, heavy) in enumerate(kinds):
            if heavy and out[i] is None:
                out[i] = next((j for j, f in enumerate(family) if f and j not in taken and f == _family(ops)
                               and (not by_size or node_sizes[i] in call_sizes[j])), None)
                if out[i] is not None:
                    taken.add(out[i])
    rest, last = [], None
    for i, (ops, heavy) in enumerate(kinds):
        if heavy:
            last = out[i]
        elif last is not None and ops & cops[last]:
            out[i] = last
        else:
            rest.append(i)
    light = [j for j, f in enumerate(family) if not f]
    for i, k in zip(rest, _in_order([nodes[i] for i in rest], [calls[j] for j in light],
                                    None if weights is None else [weights[i] for i in rest])):
        out[i] = None if k is None else light[k]
    return out


def _in_order(nodes: Sequence[str], calls: Sequence[str], weights: Sequence[float] | None = None) -> list[int | None]:
    """The alignment kept in order (see the module doc): each node to a call whose name has one of
    its operators, never going back, one heavy operator per call, the most matched: by count, heavy
    nodes double, or by ``weights`` (the nodes' times: a layer norm matched rather than the
    reshapes after it)."""
    n, m = len(nodes), len(calls)
    kinds = [node_ops(op) for op in nodes]
    cops = [task_ops(c) for c in calls]
    # a node of no time still counts: more matches where the times tie
    points = [w + 1e-9 for w in weights] if weights is not None else [2 if k[1] else 1 for k in kinds]

    def fits(i: int, j: int, heavy_taken: int) -> bool:
        ops, heavy = kinds[i]
        return bool((ops & HEAVY if heavy else ops) & cops[j]) and not (heavy and heavy_taken)

    # best[i][j][h]: most points for nodes i.. when call j is the current one (h: it has its heavy node)
    best = [[[0.0, 0.0] for _ in range(m + 1)] for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            for h in (0, 1):
                score = best[i + 1][j][h]  # node i outside
                if fits(i, j, h):
                    heavy = kinds[i][1]
                    score = max(score, points[i] + best[i + 1][j][1 if heavy else h])
                best[i][j][h] = max(score, best[i][j + 1][0])  # or move on to the next call
    out: list[int | None] = []
    i, j, h = 0, 0, 0
    while i < n:
        if j >= m:
            out.append(None)
            i += 1
            continue
        heavy = kinds[i][1]
        if fits(i, j, h) and best[i][j][h] == points[i] + best[i + 1][j][1 if heavy else h]:
            out.append(j)
            h = 1 if heavy else h
            i += 1
        elif best[i][j][h] == best[i + 1][j][h]:
            out.append(None)
            i += 1
        else:
            j, h = j + 1, 0
    return out


@dataclass
class TaskTime:
    key: str | None  # the task's workload key; None: outside tuned kernels
    name: str
    weight: int
    tvm_s: float | None  # weight x the tuned kernel's median at the share (None: the task had no config)
    ort_s: float  # the ONNX Runtime nodes matched to it, per run
    ort_nodes: list[str] = field(default_factory=list)  # "name (op)"
    # its kernels' time per run as the model ran them (the VM's instrument hook); outside: that
    # run's time minus every task's. None where the compiled model was not profiled
    in_model_s: float | None = None

    @property
    def model_s(self) -> float | None:
        """TVM's time to set against ONNX Runtime's, whose profiler times its nodes inside the
        run: the time in the model where it was measured, else the tuner's."""
        return self.in_model_s if self.in_model_s is not None else self.tvm_s

    @property
    def vs_ort(self) -> float | None:
        return self.model_s / self.ort_s if self.model_s is not None and self.ort_s > 0 else None


@dataclass
class Breakdown:
    ratio: float
    tvm_total_s: float  # the share-tuned model's end-to-end latency (interleaved rounds' median)
    ort_total_s: float  # ONNX Runtime's mean run under its profiler
    tasks: list[TaskTime]  # costliest first (TVM time)
    outside: TaskTime
    # the share-tuned model's mean run under the VM's instrument hook (its own run: what its
    # tasks' in_model_s and the outside's add up to); None where it was not profiled
    in_model_total_s: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Breakdown":
        return cls(d["ratio"], d["tvm_total_s"], d["ort_total_s"], [TaskTime(**t) for t in d["tasks"]],
                   TaskTime(**d["outside"]), d.get("in_model_total_s"))

    def loser(self) -> TaskTime | None:
        """The task that loses most time to ONNX Runtime (TVM minus ORT), if any loses."""
        worst = max((t for t in self.tasks if t.model_s is not None), key=lambda t: t.model_s - t.ort_s, default=None)
        return worst if worst is not None and worst.model_s > worst.ort_s else None


def breakdown(ratio: float, calls: Sequence[str], facts: dict[str, dict], tvm_total_s: float,
              ort: dict, in_model: dict | None = None, functions: dict[str, str | None] | None = None,
              sizes: dict[str, Sequence[int]] | None = None) -> Breakdown:
    """``calls``: the task keys in call order; ``facts``: per task key its name, weight and tuned
    kernel time at the share (from :func:`spatialtune.models.compile.records_for`); ``ort``: what
    :func:`~spatialtune.models.in_worker.profile_onnxruntime` returned; ``in_model``, if given, what
    :func:`~spatialtune.models.in_worker.profile_compiled` returned for the share-tuned model, its
    functions given to tasks by ``functions`` (:func:`call_order`'s function names -> task keys);
    ``sizes``, if given, each task's outputs' elements, to match the nodes by what they compute
    where ORT's profile has their output shapes (:func:`match_nodes`)."""
    nodes = ort["nodes"]
    by_size = sizes is not None and all(nd.get("size") for nd in nodes if node_ops(nd["op"])[1])
    where = match_nodes([nd["op"] for nd in nodes], [facts[k]["name"] for k in calls],
                        [nd.get("size") for nd in nodes] if by_size else None,
                        [tuple(sizes.get(k, ())) for k in calls] if by_size else None,
                        [nd["time_s"] for nd in nodes] if by_size else None)
    tasks = {k: TaskTime(k, f["name"], f["weight"], None if f["time_s"] is None else f["weight"] * f["time_s"], 0.0)
             for k, f in facts.items()}
    outside = TaskTime(None, "outside tuned kernels", 0, None, 0.0)
    for nd, j in zip(nodes, where):
        t = outside if j is None else tasks[calls[j]]
        t.ort_s += nd["time_s"]
        t.ort_nodes.append(f"{nd['name']} ({nd['op']})")
    outside.ort_s += ort["total_s"] - sum(nd["time_s"] for nd in nodes)
    outside.tvm_s = tvm_total_s - sum(t.tvm_s for t in tasks.values() if t.tvm_s is not None)
    if in_model is not None:
        for t in tasks.values():
            t.in_model_s = 0.0
        for symbol, f in in_model["functions"].items():
            key = (functions or {}).get(symbol)
            if key in tasks:
                tasks[key].in_model_s += f["time_s"]
        # against the hooked run's own total, not the timed latency: they are separate runs on a
        # host whose speed drifts by several percent
        outside.in_model_s = in_model["total_s"] - sum(t.in_model_s for t in tasks.values())
    ordered = sorted(tasks.values(), key=lambda t: (-(t.tvm_s or 0.0), -t.ort_s, t.name))
    return Breakdown(ratio, tvm_total_s, ort["total_s"], ordered, outside,
                     None if in_model is None else in_model["total_s"])


def output_sizes(tasks) -> dict[str, tuple[int, ...]]:
    """Per task key, the elements of each output its function writes (what a node's output is
    matched against, :func:`match_nodes`)."""
    import math

    return {w.key: tuple(math.prod(shape) for shape, _ in w.prim.outputs) for w in tasks if w.prim is not None}


def call_order(model, tasks, functions: dict[str, str | None] | None = None) -> list[str]:
    """The task keys in the order the model's ``main`` calls them (a task called three times is
    listed three times): the fused module's ``call_tir`` bindings, each callee matched to its task
    by structural equality (names are not unique across tasks TVM deduplicated). ``functions``, if
    given, receives each called function's name (as the compiled model calls it) -> its task key."""
    import tvm
    import tvm_ffi
    from tvm import relax

    from .importer import fuse

    fused = fuse(model.relax_mod)
    mods = [(w.key, w.ir_module()) for w in tasks]
    key_of: dict[str, str | None] = {}
    out: list[str] = []
    call_tir = {tvm.ir.Op.get(n) for n in ("relax.call_tir", "relax.call_tir_inplace")}
    for block in fused["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if not (isinstance(v, relax.Call) and v.op in call_tir and isinstance(v.args[0], tvm.ir.GlobalVar)):
                continue
            gv = v.args[0]
            if gv.name_hint not in key_of:
                mod = tvm.IRModule({"main": fused[gv].with_attr("global_symbol", "main")})
                h = tvm_ffi.structural_hash(mod)
                key_of[gv.name_hint] = next((k for k, m in mods if tvm_ffi.structural_hash(m) == h
                                             and tvm_ffi.structural_equal(m, mod)), None)
            if key_of[gv.name_hint] is not None:
                out.append(key_of[gv.name_hint])
    if functions is not None:
        functions.update(key_of)
    return out
