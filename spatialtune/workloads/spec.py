"""Search spaces as data: ``search_spaces/*.toml`` files of named workloads.

A file looks like::

    [space]
    name = "bert-base"
    description = "..."

    [[workload]]
    name = "bert_qkv"          # human name, unique within the file
    op = "dense"               # an operator from spatialtune.ops
    dtype = "fp32"             # or a list: ["fp32", "fp16"] expands to one workload per dtype
    shape = { M = 128, N = 2304, K = 768 }
    model = "BERT-base, seq 128"   # optional provenance

A workload's *key* is derived from what it computes only (operator, dtype, shape), so the same
spec always gets the same key whatever file or name it comes from, and it reads as what it is:
``dense_fp32_M128_N2304_K768``.

A model's space (written by ``spatialtune workloads --from-onnx``, see :mod:`.spacefile`) lists
PrimFunc tasks instead: ``name`` (TVM's task name), ``task`` (the readable part of the key),
``model``, ``weight`` (how often the model runs it), ``hash`` (the structural hash, checked
against the script when the file is read) and ``script`` (the task's TVMScript). Their key is the
readable name plus the hash (:mod:`.prim`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ..errors import SpecError
from .ops import DTYPES, Operator, get_operator
from .prim import PrimTask, prim_task, reference_outputs


PRIM = "prim"
"""The ``op`` of a workload that is a PrimFunc from a model (:mod:`.prim`), not an operator."""


@dataclass(frozen=True)
class Workload:
    op: str
    dtype: str
    params: Mapping[str, int]
    name: str = ""
    model: str = ""
    prim: PrimTask | None = None  # the task's TVMScript and facts, for op == PRIM
    weight: int = 1  # how many times its model runs it per inference (1 for an operator)

    @classmethod
    def from_prim(cls, task: PrimTask, *, name: str = "", model: str = "", weight: int = 1) -> "Workload":
        return cls(op=PRIM, dtype=task.dtype, params={}, name=name or task.task, model=model, prim=task,
                   weight=weight)

    @property
    def operator(self) -> Operator:
        if self.prim is not None:
            raise SpecError(f"{self.key} is a PrimFunc from a model: it has no operator")
        return get_operator(self.op)

    @property
    def key(self) -> str:
        if self.prim is not None:
            return self.prim.key
        return make_key(self.op, self.dtype, self.params)

    @property
    def fast_math(self) -> bool:
        """Whether its builds for a CPU replace float32 erf/exp/tanh/sigmoid by vectorisable
        approximations (:mod:`.fastmath`): a model's task unless it fell back to exact math;
        never an operator (none of them calls those functions)."""
        return self.prim is not None and not self.prim.exact_math

    @property
    def flops(self) -> int:
        if self.prim is not None:
            return self.prim.flops
        return self.operator.flops(self.params)

    @property
    def spec_hash(self) -> str:
        """Hash of what is computed: changes iff the kernel's semantics change (the operator, its
        revision, dtype and shape; the key leaves the revision out, so a database written for an
        older definition of an operator is recognised and refused rather than mixed in). For a
        PrimFunc, its structural hash: the same task from two models is one workload."""
        if self.prim is not None:
            spec: dict[str, Any] = {"prim": self.prim.hash}
        else:
            spec = {"op": self.op, "dtype": self.dtype, "params": dict(self.params)}
            if self.operator.revision:
                spec["revision"] = self.operator.revision
        canon = json.dumps(spec, sort_keys=True)
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        d = {"op": self.op, "dtype": self.dtype, "params": dict(self.params), "name": self.name, "model": self.model}
        if self.prim is not None:
            d |= {"prim": self.prim.to_dict(), "weight": self.weight}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Workload":
        if d.get("prim") is not None:
            # No TVM needed: a GPU host's runtime-only TVM reads PrimFunc workloads from a manifest.
            return cls.from_prim(PrimTask.from_dict(d["prim"]), name=d.get("name", ""), model=d.get("model", ""),
                                 weight=int(d.get("weight", 1)))
        op = get_operator(d["op"])
        return cls(op=d["op"], dtype=d["dtype"], params=op.check_params(d["params"]), name=d.get("name", ""),
                   model=d.get("model", ""))

    def prim_func(self):
        if self.prim is not None:
            return self.prim.ir_module()["main"]
        return self.operator.prim_func(self.params, self.dtype)

    def ir_module(self):
        if self.prim is not None:
            return self.prim.ir_module()
        import tvm

        return tvm.IRModule({"main": self.prim_func()})

    # -- what a measurement feeds it and checks it against --------------------------------------

    def random_inputs(self, rng: np.random.Generator) -> list[np.ndarray]:
        if self.prim is not None:
            return self.prim.random_inputs(rng)
        return self.operator.random_inputs(self.params, self.dtype, rng)

    def poisoned_outputs(self) -> list[np.ndarray]:
        """The output arrays a kernel writes, filled so that an element it leaves alone is wrong."""
        if self.prim is not None:
            return self.prim.poisoned_outputs()
        op = self.operator
        return [np.full(op.output_shape(self.params), np.nan, dtype=op.out_dtype(self.dtype))]

    def reference(self, xs: list[np.ndarray], library: str | None = None) -> list[np.ndarray]:
        """The float64 reference outputs for inputs ``xs``: the operator's numpy reference, or a
        PrimFunc's untuned module run in float64 (``library``: a prebuilt one, see :mod:`.prim`)."""
        if self.prim is not None:
            return reference_outputs(self.prim, xs, library)
        return [self.operator.reference(self.params, xs)]


def make_key(op: str, dtype: str, params: Mapping[str, int]) -> str:
    return "_".join([op, dtype] + [f"{k}{v}" for k, v in params.items()])


@dataclass
class SearchSpace:
    name: str
    path: str
    description: str = ""
    workloads: list[Workload] = field(default_factory=list)

    def select(self, names: Iterable[str] | None) -> list[Workload]:
        """Workloads by name or key, in the order asked; all of them when names is empty."""
        names = list(names or [])
        if not names:
            return list(self.workloads)
        out = []
        for n in names:
            hits = [w for w in self.workloads if n in (w.name, w.key)]
            if not hits:
                raise SpecError(
                    f"{self.path}: no workload named {n!r} (have: {', '.join(w.name for w in self.workloads)})"
                )
            out.extend(h for h in hits if h not in out)
        return out


def shipped_space_dirs() -> list[Path]:
    """Where the shipped search spaces are: ``search_spaces/`` of a checkout, else what
    ``pip install`` put under ``<prefix>/share/spatialtune/search_spaces``."""
    here = Path(__file__).resolve()
    dirs = [here.parents[2] / "search_spaces"]
    if len(here.parents) > 5:  # <prefix>/lib/pythonX.Y/site-packages/spatialtune/workloads/spec.py
        dirs.append(here.parents[5] / "share" / "spatialtune" / "search_spaces")
    try:
        import sysconfig

        dirs.append(Path(sysconfig.get_path("data")) / "share" / "spatialtune" / "search_spaces")
    except (KeyError, TypeError):
        pass
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def _space_name(f: Path) -> str:
    try:
        name = tomllib.loads(f.read_text()).get("space", {}).get("name")
    except (tomllib.TOMLDecodeError, OSError, AttributeError):
        name = None
    return name if isinstance(name, str) and name else f.stem


def shipped_spaces() -> dict[str, Path]:
    """Shipped search spaces by their ``[space]`` name (``bert-base``); the file stem
    (``bert_base``) is accepted too, as an alias."""
    out: dict[str, Path] = {}
    for d in shipped_space_dirs():
        for f in sorted(d.glob("*.toml")):
            out.setdefault(_space_name(f), f)
    return out


def load_space(path: str | Path) -> SearchSpace:
    """Parse and validate a search-space file, given by path or by the name of a shipped space
    (``demo``, ``bert-base``, ...); every problem is a SpecError naming file and field."""
    path = Path(path)
    if not path.exists() and path.suffix != ".toml" and len(path.parts) == 1:
        known = shipped_spaces()
        aliases = {f.stem: f for f in known.values()} | known
        if str(path) not in aliases:
            raise SpecError(f"{path}: no such search-space file or shipped space (shipped: {', '.join(sorted(known))})")
        path = aliases[str(path)]
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such search-space file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror}") from None
    return parse_space(raw, str(path))


def parse_space(raw: Mapping[str, Any], where: str) -> SearchSpace:
    head = raw.get("space", {})
    if not isinstance(head, dict):
        raise SpecError(f"{where}: [space] must be a table")
    unknown = set(raw) - {"space", "workload"}
    if unknown:
        raise SpecError(f"{where}: unknown top-level field {sorted(unknown)[0]!r} (expected [space] and [[workload]])")
    entries = raw.get("workload")
    if not isinstance(entries, list) or not entries:
        raise SpecError(f"{where}: no [[workload]] entries")
    space = SearchSpace(name=str(head.get("name", Path(where).stem)), path=where,
                        description=str(head.get("description", "")))
    seen_names: dict[str, str] = {}
    for i, e in enumerate(entries):
        at = f"{where}: workload[{i}]"
        if not isinstance(e, dict):
            raise SpecError(f"{at}: must be a table")
        if "script" in e:
            w = _prim_entry(e, at)
            if w.name in seen_names:
                raise SpecError(f"{at}.name: duplicate workload name {w.name!r}")
            if any(o.key == w.key for o in space.workloads):
                raise SpecError(f"{at}: the same task as an earlier entry (key {w.key}): list it once, with the "
                                "weights added")
            seen_names[w.name] = w.dtype
            space.workloads.append(w)
            continue
        for w in _op_entry(e, at):
            if w.name in seen_names:
                raise SpecError(f"{at}.name: duplicate workload name {w.name!r}")
            seen_names[w.name] = w.dtype
            space.workloads.append(w)
    return space


def _op_entry(e: Mapping[str, Any], at: str) -> list[Workload]:
    """An entry naming an operator and its shape: one workload per dtype it lists (named
    ``NAME_DTYPE`` when it lists several)."""
    extra = set(e) - {"name", "op", "dtype", "shape", "model"}
    if extra:
        raise SpecError(f"{at}.{sorted(extra)[0]}: unknown field (fields: name, op, dtype, shape, model)")
    for req in ("name", "op", "shape"):
        if req not in e:
            raise SpecError(f"{at}.{req}: missing")
    name = e["name"]
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise SpecError(f"{at}.name: must be a non-empty string without spaces, got {name!r}")
    op, params = _entry_op(e, at)
    dtypes = _entry_dtypes(e, at, op)
    model = e.get("model", "")
    if not isinstance(model, str):
        raise SpecError(f"{at}.model: must be a string")
    return [Workload(op=op.name, dtype=dt, params=params, name=name if len(dtypes) == 1 else f"{name}_{dt}",
                     model=model) for dt in dtypes]


def _entry_op(e: Mapping[str, Any], at: str):
    """The entry's operator and its shape, checked by the operator."""
    try:
        op = get_operator(e["op"]) if isinstance(e["op"], str) else None
    except SpecError as err:
        raise SpecError(f"{at}.op: {err}") from None
    if op is None:
        raise SpecError(f"{at}.op: must be a string")
    if not isinstance(e["shape"], dict):
        raise SpecError(f"{at}.shape: must be a table like {{ M = 128, N = 768, K = 768 }}")
    try:
        params = op.check_params(e["shape"])
        op.output_shape(params)
    except SpecError as err:
        raise SpecError(f"{at}.shape: {err}") from None
    return op, params


def _entry_dtypes(e: Mapping[str, Any], at: str, op) -> list[str]:
    """The dtypes the entry lists (one string or a list), each known and supported by ``op``."""
    dtypes = e.get("dtype", "fp32")
    dtypes = [dtypes] if isinstance(dtypes, str) else dtypes
    if not isinstance(dtypes, list) or not dtypes:
        raise SpecError(f"{at}.dtype: must be a string or a list of strings")
    for dt in dtypes:
        if dt not in DTYPES:
            raise SpecError(f"{at}.dtype: unknown dtype {dt!r} (known: {', '.join(DTYPES)})")
        if dt not in op.dtypes:
            raise SpecError(f"{at}.dtype: {op.name} does not support {dt}")
    return dtypes



PRIM_FIELDS = ("name", "task", "model", "weight", "hash", "script", "exact_math", "weights")


def _prim_entry(e: Mapping[str, Any], at: str) -> Workload:
    extra = set(e) - set(PRIM_FIELDS)
    if extra:
        raise SpecError(f"{at}.{sorted(extra)[0]}: unknown field for a PrimFunc task (fields: {', '.join(PRIM_FIELDS)})")
    for req in ("name", "hash", "script"):
        if req not in e:
            raise SpecError(f"{at}.{req}: missing")
    for f in ("name", "task", "model", "hash", "script", "exact_math"):
        if f in e and not isinstance(e[f], str):
            raise SpecError(f"{at}.{f}: must be a string")
    name = e["name"]
    if not name or any(c.isspace() for c in name):
        raise SpecError(f"{at}.name: must be a non-empty string without spaces, got {name!r}")
    weight = e.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise SpecError(f"{at}.weight: must be a positive integer (how often the model runs the task), got {weight!r}")
    try:
        task = prim_task(e["script"], e.get("task") or name)
    except SpecError as err:
        raise SpecError(f"{at}.script: {err}") from None
    if task.hash != e["hash"]:
        raise SpecError(f"{at}.hash: the script hashes to {task.hash}, not {e['hash']}: it was edited or written by "
                        "another TVM; extract the model's tasks again")
    if e.get("exact_math"):
        task = dataclasses.replace(task, exact_math=e["exact_math"])
    if "weights" in e:
        ws, n = e["weights"], len(task.inputs)
        if not isinstance(ws, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in ws):
            raise SpecError(f"{at}.weights: must be a list of input indices below {n} (the inputs that are the model's "
                            f"weights), got {ws!r}")
        task = dataclasses.replace(task, weights=tuple(sorted(set(ws))))
    return Workload.from_prim(task, name=name, model=e.get("model", ""), weight=weight)
