"""Search-space files written out: the inverse of :func:`.spec.parse_space` for a model's tasks.

``spatialtune workloads --from-onnx`` writes what it extracted here; reading the file back gives
the same workloads, keys and scripts (the scripts are TOML multi-line literal strings, taken
verbatim, so the text round-trips exactly and its structural hash is checked on every read).
"""

from __future__ import annotations

import json
from typing import Sequence

from .spec import Workload


def _string(s: str) -> str:
    # A literal string keeps the script readable in the file; a script that a literal string cannot
    # hold (it contains ''' or control characters, or ends in a quote) goes in as an escaped one.
    if "'''" in s or s.endswith("'") or any(ord(c) < 32 and c not in "\n\t" for c in s):
        return json.dumps(s)
    return "'''\n" + s + "'''"


def format_space(name: str, description: str, workloads: Sequence[Workload]) -> str:
    """The TOML text of a search space of operator or PrimFunc workloads."""
    lines = ["[space]", f"name = {json.dumps(name)}", f"description = {json.dumps(description)}", ""]
    for w in workloads:
        lines.append("[[workload]]")
        lines.append(f"name = {json.dumps(w.name or w.key)}")
        if w.model:
            lines.append(f"model = {json.dumps(w.model)}")
        if w.prim is None:
            lines.append(f"op = {json.dumps(w.op)}")
            lines.append(f"dtype = {json.dumps(w.dtype)}")
            lines.append("shape = { " + ", ".join(f"{k} = {v}" for k, v in w.params.items()) + " }")
        else:
            p = w.prim
            lines.append(f"task = {json.dumps(p.task)}")
            lines.append(f"weight = {int(w.weight)}")
            lines.append(f"hash = {json.dumps(p.hash)}")
            if p.exact_math:  # a task that builds with exact math on a CPU, and why (see workloads.fastmath)
                lines.append(f"exact_math = {json.dumps(p.exact_math)}")
            if p.weights is not None:  # inputs that are the model's weights (how ``cold`` times the task)
                lines.append(f"weights = {list(p.weights)}")
            shapes = ", ".join(f"{'x'.join(map(str, s)) or 'scalar'} {dt}" for s, dt in p.args)
            lines.append(f"# {p.flops / 1e6:.3g} MFLOP; {shapes} (last {p.n_outputs} written)")
            lines.append(f"script = {_string(p.script)}")
        lines.append("")
    return "\n".join(lines)
