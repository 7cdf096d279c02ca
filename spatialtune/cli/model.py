"""``spatialtune model``: a whole model's latency under each share, with the kernels tuned for that
share, with those tuned for 100 %, untuned, and ONNX Runtime on the same cores."""

from __future__ import annotations

import json
import sys

from ..errors import ConfigError
from .common import db_arg, open_db
from .tables import fmt_time


def add_model(sub) -> None:
    p = sub.add_parser("model", help="compile a whole ONNX model with per-share kernels and time it under each "
                                     "share next to ONNX Runtime")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--ratios", default="100", help="shares to run at, percent, e.g. 25,50,100")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=D1,D2,...",
                   help="static shape of a model input (as given to workloads --from-onnx)")
    p.add_argument("--repeat", type=int, default=5, help="timed repeats per variant (median counts)")
    p.add_argument("--min-repeat-ms", type=int, default=50, help="each repeat runs at least this long")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per variant and share")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--mcpu", default=None, help="the LLVM CPU the tuning records were measured for")
    p.add_argument("--exact-math", action="store_true",
                   help="build the tuned variants with exact erf/exp/tanh (default: vectorisable approximations "
                        "for the tasks whose output check passes with them; see docs/models.md)")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON array instead of tables")
    db_arg(p)
    p.set_defaults(func=_cmd_model)


def _cmd_model(a) -> int:
    from ..models.e2e import ModelOptions, measure_model
    from ..models.importer import parse_shapes
    from ..terms import parse_ratios

    ratios = parse_ratios(a.ratios)
    if a.repeat < 1 or a.timeout <= 0 or a.min_repeat_ms < 0:
        raise ConfigError("--repeat must be at least 1, --timeout positive, --min-repeat-ms not negative")
    opts = ModelOptions(repeat=a.repeat, min_repeat_ms=a.min_repeat_ms, timeout=a.timeout, seed=a.seed, mcpu=a.mcpu,
                        fast_math=not a.exact_math)
    shapes = parse_shapes(a.shape)
    with open_db(a.db, create=True) as db:
        res = measure_model(a.model, ratios, db, shapes=shapes, options=opts,
                            progress=None if a.json else (lambda s: print(s, file=sys.stderr)))
    if a.json:
        print(json.dumps([r.to_dict() for r in res.rows], indent=1))
    else:
        print(format_model(res))
    return 0 if all(r.status == "ok" for r in res.rows) else 1


def format_model(res) -> str:
    """Per share: each variant's latency, its ratio to ONNX Runtime's, the check against it."""
    from .tables import text_table

    dev = res.device
    out = [f"model: {res.model.name} ({res.model.path}, {len(res.tasks)} tasks)  device: {dev.name} "
           f"({dev.units} {dev.unit}s, {dev.id})  partition: {res.partition}"]
    for r in res.ratios:
        rows = [x for x in res.rows if x.ratio == r]
        ort = next((x for x in rows if x.variant == "onnxruntime" and x.latency_s), None)
        table = []
        for x in rows:
            vs = f"{x.latency_s / ort.latency_s:.2f}x" if ort and x.latency_s else "-"
            tuned = "-" if x.tuned_tasks is None else f"{x.tuned_tasks}/{x.n_tasks}"
            table.append([x.variant, fmt_time(x.latency_s), vs, "-" if x.rel_err is None else f"{x.rel_err:.1e}",
                          tuned, "-" if x.trials is None else str(x.trials),
                          x.status if x.status == "ok" else f"{x.status}: {x.error[:80]}"])
        units = rows[0].granted_units if rows else "?"
        out += ["", f"share {r:g}% ({units} cores)",
                text_table(["variant", "latency", "vs ONNX Runtime", "error vs ORT", "tasks tuned", "trials", "status"],
                       table)]
        top = costliest_task(next((x for x in rows if x.variant == "share-tuned"), None))
        if top:
            out.append(f"costliest task at this share: {top['name']} (weight {top['weight']} x "
                       f"{fmt_time(top['time_s'])} = {top['part']:.0%} of the tuned kernels' time)")
    return "\n".join(out)


def costliest_task(row) -> dict | None:
    """The task of a share-tuned run whose weight x kernel time is largest, with its part of the sum."""
    tasks = [t for t in ((row.detail or {}).get("tasks", {}).values() if row else []) if t.get("time_s")]
    if not tasks:
        return None
    total = sum(t["weight"] * t["time_s"] for t in tasks)
    top = max(tasks, key=lambda t: t["weight"] * t["time_s"])
    return top | {"part": top["weight"] * top["time_s"] / total}
