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
    p.add_argument("--rounds", "--repeat", dest="rounds", type=int, default=10,
                   help="interleaved timing rounds per share, every variant once per round (its median counts)")
    p.add_argument("--min-repeat-ms", type=int, default=100, help="a variant's slot in a round runs at least this long")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds per call into the measuring worker (a variant's load, one slot, the profile)")
    p.add_argument("--profile", action="store_true",
                   help="per share, each task's weight x kernel time next to ONNX Runtime's profile of the same "
                        "operators, and the time outside the tuned kernels")
    p.add_argument("--floors", action="store_true",
                   help="only profile ONNX Runtime under each share and store its time for each task's operators "
                        "as the task's floor, which tuning then works towards (no tuned kernel needed; compiles "
                        "and times nothing else)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--mcpu", default=None, help="the LLVM CPU the tuning records were measured for")
    p.add_argument("--exact-math", action="store_true",
                   help="build the tuned variants with exact erf/exp/tanh (default: vectorisable approximations "
                        "for the tasks whose output check passes with them; see docs/models.md)")
    p.add_argument("--layout", default="auto",
                   help="convolutions in this layout: auto (default: blocked by this CPU's fp32 vector width when every "
                        "convolution takes it, large 3x3 ones as Winograd), nchw, NCHW<b>c or NCHW<b>c+winograd; "
                        "as the tasks were extracted (docs/models.md)")
    p.add_argument("--rerank-cold", type=int, default=0, metavar="K",
                   help="share-tuned: of each task's K fastest kernels at the share, compile the one fastest with its "
                        "data out of the caches, as inside the model (docs/models.md; default 0: the fastest)")
    p.add_argument("--interference", default="none",
                   help="compile the kernels tuned under this condition (none, or cold: each run timed after the "
                        "caches were emptied but for its activations; docs/models.md)")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON array instead of tables")
    db_arg(p)
    p.set_defaults(func=_cmd_model)


def _cmd_model(a) -> int:
    from ..models.e2e import ModelOptions, measure_model
    from ..models.importer import parse_shapes
    from ..terms import check_interference, parse_ratios

    ratios = parse_ratios(a.ratios)
    check_interference(a.interference)
    if a.rounds < 1 or a.timeout <= 0 or a.min_repeat_ms < 0 or a.rerank_cold < 0:
        raise ConfigError("--rounds must be at least 1, --timeout positive, --min-repeat-ms and --rerank-cold not "
                          "negative")
    opts = ModelOptions(rounds=a.rounds, min_repeat_ms=a.min_repeat_ms, timeout=a.timeout, seed=a.seed, mcpu=a.mcpu,
                        profile=a.profile, fast_math=not a.exact_math, layout=a.layout, rerank_cold=a.rerank_cold,
                        interference=a.interference)
    shapes = parse_shapes(a.shape)
    if a.floors:
        from ..models.floors import profile_floors

        with open_db(a.db, create=True) as db:
            got = profile_floors(a.model, ratios, db, shapes=shapes, options=opts,
                                 progress=lambda s: print(s, file=sys.stderr))
        if a.json:
            print(json.dumps({f"{r:g}": v for r, v in got.items()}, indent=1))
        return 0
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
        ort = next((x for x in rows if x.variant == "onnxruntime" and x.vendor_s), None)
        table = []
        for x in rows:
            vs = f"{x.latency_s / ort.vendor_s:.2f}x" if ort and x.latency_s else "-"
            tuned = "-" if x.tuned_tasks is None else f"{x.tuned_tasks}/{x.n_tasks}"
            spin = (x.detail or {}).get("spinning_s") if x.variant == "onnxruntime" else None
            table.append([x.variant + (f" (alone, threads spinning: {fmt_time(spin)})" if spin else
                                       " (threads spinning, own process)" if (x.detail or {}).get("spinning") else ""),
                          fmt_time(x.latency_s), vs, "-" if x.rel_err is None else f"{x.rel_err:.1e}",
                          tuned, "-" if x.trials is None else str(x.trials),
                          _status(x)])
        units = rows[0].granted_units if rows else "?"
        out += ["", f"share {r:g}% ({units} cores)",
                text_table(["variant", "latency", "vs ONNX Runtime", "error vs ORT", "tasks tuned", "trials", "status"],
                       table)]
        st = next((x for x in rows if x.variant == "share-tuned"), None)
        facts = (st.detail or {}).get("tasks", {}) if st else {}
        if facts:
            out.append("kernels: " + "; ".join(f"{f['name']} {f.get('origin') or 'untuned'}"
                                               for f in facts.values()))
        top = st.costliest_task() if st else None
        if top:
            out.append(f"costliest task at this share: {top['name']} (weight {top['weight']} x "
                       f"{fmt_time(top['time_s'])} = {top['part']:.0%} of the tuned kernels' time)")
        if r in res.profiles:
            out += ["", format_profile(res.profiles[r])]
        elif any("profile_error" in x.detail for x in rows):
            out.append("no profile: " + next(x.detail["profile_error"] for x in rows if "profile_error" in x.detail))
    return "\n".join(out)


def _status(x) -> str:
    if x.status != "ok":
        return f"{x.status}: {x.error[:80]}"
    same = (x.detail or {}).get("same_as")
    return f"ok (same kernels as {same}: timed once)" if same else "ok"


def format_profile(bd) -> str:
    """A :class:`~spatialtune.models.profile.Breakdown` as a table: per task TVM's weight x kernel
    time (the tuner's), its kernels' time inside the model where that was measured, and ONNX
    Runtime's time for the nodes matched to it, then the rest, then the totals; "vs ORT" sets the
    time inside the model against ORT's, as ORT's profiler measures its nodes inside the run."""
    from .tables import text_table

    inside = bd.outside.in_model_s is not None

    def row(t, nodes: str) -> list[str]:
        vs = f"{t.vs_ort:.2f}x" if t.vs_ort is not None else "-"
        diff = "-" if t.model_s is None else ("+" if t.model_s >= t.ort_s else "-") + fmt_time(abs(t.model_s - t.ort_s))
        tuner = fmt_time(t.tvm_s) if t.tvm_s is not None else "untuned"
        return [t.name, str(t.weight) if t.key else "", tuner,
                *([fmt_time(t.in_model_s)] if inside else []), fmt_time(t.ort_s), vs, diff, nodes]

    def nodes(t) -> str:
        return ", ".join(t.ort_nodes[:3]) + (f" +{len(t.ort_nodes) - 3}" if len(t.ort_nodes) > 3 else "")

    table = [row(t, nodes(t)) for t in bd.tasks] + [row(bd.outside, nodes(bd.outside) or "(executor)")]
    total = [["total", "", fmt_time(bd.tvm_total_s), *([fmt_time(bd.in_model_total_s)] if inside else []),
              fmt_time(bd.ort_total_s), f"{bd.tvm_total_s / bd.ort_total_s:.2f}x" if bd.ort_total_s > 0 else "-",
              "", ""]]
    head = ["task", "weight", "TVM alone", *(["TVM in model"] if inside else []), "ONNX Runtime", "vs ORT",
            "TVM - ORT", "ORT nodes"]
    out = ["where the time goes (TVM alone: weight x the tuned kernel's time at this share from the database; "
           + ("TVM in model: its kernels' time per run as the share-tuned model ran them, in a run of its own "
              "with the VM's instrument hook; " if inside else "")
           + "outside: the rest of that run's time; ONNX Runtime: its profiler's mean run, nodes matched "
           "by operator)",
           text_table(head, table + total)]
    lose = bd.loser()
    if lose:
        out.append(f"loses most: {lose.name}, {fmt_time(lose.model_s - lose.ort_s)} slower than ONNX Runtime's "
                   f"{len(lose.ort_nodes)} node(s) ({lose.vs_ort:.2f}x)" if lose.ort_s > 0 else
                   f"loses most: {lose.name}, {fmt_time(lose.model_s)} with no ONNX Runtime node matched")
    return "\n".join(out)
