"""``spatialtune bundle``: build candidates here, measure them on a GPU host, import the results."""

from __future__ import annotations

from ..errors import ConfigError
from .bundle_models import add_bundle_models
from .common import Parser, db_arg, open_db


def add_bundle(sub) -> None:
    p = sub.add_parser("bundle", help="build candidates here, measure them on a GPU host, import the results")
    bs = p.add_subparsers(dest="bundle_command", metavar="ACTION", parser_class=Parser)
    b = bs.add_parser("build", help="a GPU round: tune into a bundle directory (candidates built with cubins, "
                      "measured later by bundle run)")
    b.add_argument("--space", required=True)
    b.add_argument("--workload", action="append", default=[], metavar="NAME", help="repeatable; default: all")
    b.add_argument("--target", default="cuda", choices=("cuda", "cpu"),
                   help="cuda; cpu runs the same loop on this host's cores (for tests)")
    b.add_argument("--arch", default=None, help="CUDA: sm_XY to compile for (default: the --db device's; needed "
                   "for a first round)")
    b.add_argument("--candidates", type=int, default=32, help="new candidates per workload and share (tune's "
                   "--batch: a round proposes one search batch per share)")
    b.add_argument("--workload-candidates", action="append", default=[], metavar="NAME=N",
                   help="new candidates per share for one workload (repeatable)")
    b.add_argument("--trials", type=int, default=None, help="budget per workload and share across rounds, as "
                   "tune's (default: none, every round proposes a batch)")
    b.add_argument("--build-workers", type=int, default=2)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True, help="bundle directory")
    b.add_argument("--db", default=None, help="next round: tune from the measurements and cost models of this "
                   "database (after bundle import); without it, a first round from nothing")
    b.add_argument("--device", default=None, metavar="ID", help="with --db: the device to continue from "
                   "(needed when the database holds several of the target's kind)")
    b.add_argument("--share", action="append", default=[], metavar="PART:SHARE[:INTERF]",
                   help="shares to tune (repeatable; default: with --db every share measured without a neighbour, "
                   "else the whole device)")
    b.add_argument("--transfer-top", type=int, default=2, help="each share's best configs measured at every share, "
                   "and each share's winners measured again beside the new candidates")
    b.add_argument("--explore", action="append", default=[], metavar="NAME=N",
                   help="add N uniform samples of the design space for a workload (repeatable; no cost model)")
    b.add_argument("--cost-model", default="xgb", help="as tune's: a share's saved model of this kind is reused "
                   "while nothing was measured since it was fit, else one is fit on the device's measurements")
    b.set_defaults(func=_cmd_bundle_build)
    _add_run(bs)
    i = bs.add_parser("import", help="record bundle results in the database and retrain the cost models")
    i.add_argument("results", help="results directory or results.json")
    i.add_argument("--cost-model", default="xgb")
    db_arg(i)
    i.set_defaults(func=_cmd_bundle_import)
    add_bundle_models(bs)
    _add_estimate(bs)


def _add_run(bs) -> None:
    r = bs.add_parser("run", help="measure a bundle on this GPU (runtime-only TVM, numpy, cuda-bindings)")
    r.add_argument("bundle")
    r.add_argument("--out", required=True, help="results directory")
    r.add_argument("--partition", default="mps", choices=("mps", "green"))
    r.add_argument("--ratios", default="100", help="percent, e.g. 100,50,25,12")
    r.add_argument("--interference", default="none", help="comma list: none,compute,memory,tenant:WORKLOAD")
    r.add_argument("--condition", action="append", default=[], metavar="PART:SHARE[:INTERF]",
                   help="explicit conditions instead (repeatable): mps:50, green:64sm, mps:50:compute")
    r.add_argument("--top", type=int, default=None, help="after the first condition, measure only the top N")
    r.add_argument("--repeat", type=int, default=5)
    r.add_argument("--min-repeat-ms", type=int, default=10)
    r.add_argument("--timeout", type=float, default=20.0, help="seconds per candidate")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-vendor", dest="vendor", action="store_false",
                   help="leave out the cuBLAS baseline (torch's matmul in the same worker, when torch is there)")
    r.add_argument("--no-models", dest="models", action="store_false",
                   help="leave out the bundle's whole models (bundle models)")
    r.add_argument("--model-rounds", type=int, default=3, help="interleaved rounds per model and condition")
    r.add_argument("--model-min-repeat-ms", type=int, default=50, help="each variant's slot in a round lasts this long")
    r.set_defaults(func=_cmd_bundle_run)


def _add_estimate(bs) -> None:
    e = bs.add_parser("estimate", help="the device time a bundle run will take, per part, from the manifest's "
                      "counts; exit 2 when its measuring run exceeds --budget")
    e.add_argument("bundle")
    e.add_argument("--conditions", type=int, required=True, help="how many conditions the run measures")
    e.add_argument("--top", type=int, default=None, help="as bundle run's")
    e.add_argument("--no-vendor", dest="vendor", action="store_false")
    e.add_argument("--no-models", dest="models", action="store_false")
    e.add_argument("--model-rounds", type=int, default=3)
    e.add_argument("--model-min-repeat-ms", type=int, default=50)
    e.add_argument("--budget", type=float, default=None, help="seconds the measuring run may take")
    e.set_defaults(func=_cmd_bundle_estimate)


def _cmd_bundle_build(a) -> int:
    from .bundle_round import build_round

    per_wl, explore = _counts("--workload-candidates", a.workload_candidates), _counts("--explore", a.explore)
    if a.candidates < 1 or any(n < 1 for n in per_wl.values()):
        raise ConfigError(f"--candidates and --workload-candidates must be positive, got {a.candidates}"
                          f"{''.join(f', {k}={n}' for k, n in per_wl.items())}")
    m, summary = build_round(a, per_wl, explore)
    built = sum(c["status"] == "ok" for c in m["candidates"])
    print(f"bundle {a.out}: {built}/{len(m['candidates'])} candidates built for {m['arch']} "
          f"({', '.join(m['workloads'])}) in {m['build_s']} s")
    for wk, info in summary.items():
        print(f"  {wk}: from {info['measured']} measurements: {info['new']} new, {info['uniform']} uniform samples, "
              f"{info['transfer']} winners to measure at other shares, {info['best']} winners re-measured, "
              f"{info['matrix']} other conditions' winners for the winners matrix")
    return 0


def _counts(opt: str, items) -> dict[str, int]:
    out = {}
    for item in items:
        name, sep, n = item.rpartition("=")
        if not sep or not name or not n.strip().isdigit():
            raise ConfigError(f"{opt} {item!r}: expected NAME=N, e.g. mm_1024=8")
        out[name] = int(n)
    return out


def _cmd_bundle_run(a) -> int:
    from ..bundle.run import RunOptions, conditions_from, run_bundle
    from ..bundle.table import format_models, format_table
    from ..terms import parse_condition
    from ..terms import parse_ratios

    if a.condition:
        conds = [parse_condition(c) for c in a.condition]
    else:
        conds = conditions_from(a.partition, parse_ratios(a.ratios), [s.strip() for s in a.interference.split(",")])
    if a.model_rounds < 1 or a.model_min_repeat_ms < 0:
        raise ConfigError("--model-rounds must be at least 1 and --model-min-repeat-ms not negative")
    res = run_bundle(a.bundle, a.out, conds, RunOptions(repeat=a.repeat, min_repeat_ms=a.min_repeat_ms,
                                                        timeout=a.timeout, top=a.top, seed=a.seed, vendor=a.vendor,
                                                        models=a.models, model_rounds=a.model_rounds,
                                                        model_min_repeat_ms=a.model_min_repeat_ms))
    print(format_table(res))
    if res.get("model_runs") or res.get("onnxruntime"):
        print()
        print(format_models(res))
    return 0


def _cmd_bundle_estimate(a) -> int:
    from ..bundle.estimate import RunPlan, estimate, format_estimate
    from ..bundle.manifest import load_manifest

    if a.conditions < 1 or a.model_rounds < 1:
        raise ConfigError(f"--conditions and --model-rounds must be positive, got {a.conditions}, {a.model_rounds}")
    parts = estimate(load_manifest(a.bundle), RunPlan(a.conditions, top=a.top, vendor=a.vendor, models=a.models,
                                                      model_rounds=a.model_rounds,
                                                      model_min_repeat_ms=a.model_min_repeat_ms))
    print(format_estimate(parts, a.budget))
    if a.budget is not None and parts["run"] > a.budget:
        raise ConfigError(f"the estimated measuring run ({parts['run']:.0f} s) exceeds the budget ({a.budget:.0f} s): "
                          f"refused, nothing measured (fewer conditions, a lower TOP, NEIGHBOURS=0, MODELS=0 or "
                          f"VENDOR=0 shorten it; GPU_CHECK_BUDGET_S raises the budget)")
    return 0


def _cmd_bundle_import(a) -> int:
    from ..bundle.importer import import_results
    from ..tuning.models import retrain

    with open_db(a.db, create=True) as db:
        s = import_results(a.results, db)
        trained = retrain(db, s["device_id"], s["units"], s["keys"], a.cost_model)
    print(f"imported {s['added']} measurements ({s['skipped']} already there) for {s['device']} [{s['device_id']}] "
          f"into {a.db or 'the default database'}; retrained {trained} cost models; "
          f"{s['baselines']} cuBLAS baselines; {s['model_runs']} model runs")
    return 0
