"""``spatialtune`` command line: parse, call one library function, format.

Library errors (:class:`SpatialtuneError`) become one line on stderr and exit code 2; ``--debug``
shows the traceback instead. Each subcommand is registered by an ``_add_*`` function below.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable

from .errors import ConfigError, SpatialtuneError

log = logging.getLogger("spatialtune")

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(msg: str) -> int:
    print(f"spatialtune: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _db_arg(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    p.add_argument("--db", required=required, help="tuning database (default: tuning_db/spatialtune.sqlite, "
                   "or $SPATIALTUNE_DB)")


def _open_db(path: str | None, *, create: bool):
    from .database import TuningDatabase
    from .tune import default_db_path

    if path:
        return TuningDatabase(Path(path), create=create)
    default = default_db_path()
    if create:
        default.parent.mkdir(parents=True, exist_ok=True)
    return TuningDatabase(default, create=create)


# ---------------------------------------------------------------- tune


def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="tune workloads for shares of the device")
    p.add_argument("--space", required=True, help="search-space file (search_spaces/*.toml)")
    p.add_argument("--workload", action="append", default=[], metavar="NAME",
                   help="workload name or key (repeatable; default: all in the space)")
    p.add_argument("--ratios", default="100", help="shares to tune for, percent, e.g. 25,50,100")
    p.add_argument("--interference", default="none", help="none, compute, memory or tenant:WORKLOAD")
    p.add_argument("--trials", type=int, default=32, help="trials per (workload, share), earlier runs included")
    p.add_argument("--batch", type=int, default=8, help="candidates built and measured per round")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS", help="stop after this long")
    p.add_argument("--target", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--partition", default=None, help="cpu (default for --target cpu), mps or green")
    p.add_argument("--cost-model", default="xgb", help="xgb or random")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per candidate measurement")
    p.add_argument("--repeat", type=int, default=5, help="timed repeats per candidate (median counts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baselines", action="store_true", help="skip TVM-default and numpy baselines")
    _db_arg(p)
    p.set_defaults(func=_cmd_tune)


def _cmd_tune(a) -> int:
    from .partition import parse_ratios
    from .progress import Progress
    from .runner import RunSettings
    from .spec import load_space
    from .tune import TuneOptions, tune

    ratios = parse_ratios(a.ratios)
    space = load_space(a.space)
    workloads = space.select(a.workload)
    if a.timeout <= 0 or a.repeat < 1:
        raise ConfigError("--timeout must be positive and --repeat at least 1")
    opts = TuneOptions(trials=a.trials, batch=a.batch, time_budget_s=a.time_budget, target=a.target,
                       partition=a.partition, interference=a.interference, cost_model=a.cost_model, seed=a.seed,
                       baselines=not a.no_baselines, run=RunSettings(repeat=a.repeat, timeout=a.timeout, seed=a.seed))
    opts.validate()
    with _open_db(a.db, create=True) as db:
        bar = Progress(total_jobs=len(workloads) * len(ratios))
        try:
            summary = tune(workloads, ratios, db, opts, progress=bar.update)
        finally:
            bar.close()
    from .progress import format_summary

    print(format_summary(summary))
    return 0


# ---------------------------------------------------------------- workloads, show


def _add_workloads(sub) -> None:
    p = sub.add_parser("workloads", help="list the workload keys of a search space")
    p.add_argument("--space", required=True)
    p.set_defaults(func=_cmd_workloads)


def _cmd_workloads(a) -> int:
    from .spec import load_space

    for w in load_space(a.space).workloads:
        shape = " ".join(f"{k}={v}" for k, v in w.params.items())
        print(f"{w.key}\t{w.name}\t{w.op}\t{w.dtype}\t{shape}\t{w.flops / 1e9:.3f} GFLOP")
    return 0


def _add_show(sub) -> None:
    p = sub.add_parser("show", help="best config per (workload, share, interference, device)")
    _db_arg(p)
    p.add_argument("--workload", action="append", default=[], metavar="NAME", help="name or key (repeatable)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.set_defaults(func=_cmd_show)


def _cmd_show(a) -> int:
    from .progress import format_best_table

    with _open_db(a.db, create=False) as db:
        keys: list[str | None] = [None]
        if a.workload:
            keys = []
            for name in a.workload:
                found = db.find_workload(name)
                if not found:
                    raise ConfigError(f"no workload {name!r} in {db.path}")
                keys += found
        rows = [b for k in keys for b in db.best(workload_key=k)]
        devices = {d["id"]: d for d in db.devices()}
        if a.json:
            for b in rows:
                d = b.to_dict() | {"device_name": devices.get(b.device_id, {}).get("name", "")}
                print(json.dumps(d))
        else:
            print(format_best_table(rows, devices, db))
    return 0


# ---------------------------------------------------------------- lookup, report, db (issue 4)


def _add_lookup(sub) -> None:
    p = sub.add_parser("lookup", help="the config a scheduler should use for a granted share (JSON)")
    _db_arg(p)
    p.add_argument("--workload", required=True, help="workload name or key")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ratio", type=float, help="granted share, percent of the device")
    g.add_argument("--units", type=int, help="granted cores or SMs")
    p.add_argument("--interference", default="none")
    p.add_argument("--device", default=None, help="device id (needed when the database holds several)")
    p.add_argument("--partition", default=None, help="cpu, mps or green (needed when several were tuned)")
    p.add_argument("--trace", action="store_true", help="include the stored trace")
    p.set_defaults(func=_cmd_lookup)


def _cmd_lookup(a) -> int:
    from .lookup import Lookup

    path = Path(a.db) if a.db else None
    if path is None:
        from .tune import default_db_path

        path = default_db_path()
    if not path.is_file():
        raise ConfigError(f"{path}: no such database")
    with Lookup(path, check_interval_s=None) as lk:
        r = lk.lookup(a.workload, ratio=a.ratio, units=a.units, interference=a.interference, device=a.device,
                      partition=a.partition)
        out = r.to_dict()
        if a.trace:
            out["trace"] = lk.trace(r)
    print(json.dumps(out, indent=2))
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write report.md, report.html and plots of a tuning database")
    _db_arg(p)
    p.add_argument("--out", required=True, help="output directory (created)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(a) -> int:
    from .report import write_report

    with _open_db(a.db, create=False) as db:
        paths = write_report(db, Path(a.out))
    for p in paths:
        print(p)
    return 0


def _add_db(sub) -> None:
    p = sub.add_parser("db", help="database interop: MetaSchedule export/import, merge")
    dsub = p.add_subparsers(dest="db_command", metavar="DBCOMMAND", parser_class=_Parser, required=True)
    e = dsub.add_parser("export-metaschedule", help="write a MetaSchedule JSON database of one share's best configs")
    _db_arg(e)
    e.add_argument("--ratio", type=float, required=True)
    e.add_argument("--out", required=True, help="directory for database_workload.json, database_tuning_record.json")
    e.add_argument("--interference", default="none")
    e.add_argument("--device", default=None)
    e.add_argument("--partition", default=None)
    e.set_defaults(func=_cmd_db_export)
    i = dsub.add_parser("import-metaschedule", help="take a MetaSchedule JSON database as measured records")
    i.add_argument("dir", help="directory holding database_workload.json and database_tuning_record.json")
    _db_arg(i)
    i.add_argument("--ratio", type=float, required=True, help="the share those records were measured under")
    i.add_argument("--interference", default="none")
    i.add_argument("--device", default=None, help="device id in the database (default: this machine)")
    i.add_argument("--partition", default=None)
    i.add_argument("--space", default=None, help="search-space file naming the workloads to match")
    i.set_defaults(func=_cmd_db_import)
    m = dsub.add_parser("merge", help="merge databases from several tuning hosts into a new one")
    m.add_argument("sources", nargs="+", metavar="DB")
    m.add_argument("--out", required=True)
    m.set_defaults(func=_cmd_db_merge)


def _cmd_db_export(a) -> int:
    from .interop import export_metaschedule

    with _open_db(a.db, create=False) as db:
        s = export_metaschedule(db, a.ratio, Path(a.out), interference=a.interference, device_id=a.device,
                                partition=a.partition)
    print(json.dumps(s.to_dict()))
    return 0


def _cmd_db_import(a) -> int:
    from .interop import import_metaschedule

    workloads = None
    if a.space:
        from .spec import load_space

        workloads = load_space(a.space).workloads
    with _open_db(a.db, create=True) as db:
        s = import_metaschedule(db, Path(a.dir), a.ratio, interference=a.interference, device_id=a.device,
                                partition=a.partition, workloads=workloads)
    print(json.dumps(s.to_dict()))
    return 0


def _cmd_db_merge(a) -> int:
    from .interop import merge_databases

    s = merge_databases([Path(x) for x in a.sources], Path(a.out))
    print(json.dumps(s.to_dict()))
    return 0


# ---------------------------------------------------------------- bundle (issue 3)


def _add_bundle(sub) -> None:
    p = sub.add_parser("bundle", help="build candidates here, measure them on a GPU host, import the results")
    bs = p.add_subparsers(dest="bundle_command", metavar="ACTION", parser_class=_Parser)
    b = bs.add_parser("build", help="search and build candidates with cubins into a bundle directory")
    b.add_argument("--space", required=True)
    b.add_argument("--workload", action="append", default=[], metavar="NAME", help="repeatable; default: all")
    b.add_argument("--target", default="cuda", choices=("cuda", "cpu"),
                   help="cuda; cpu runs the same loop on this host's cores (for tests)")
    b.add_argument("--arch", default="sm_90")
    b.add_argument("--candidates", type=int, default=32, help="new candidates per workload")
    b.add_argument("--workload-candidates", action="append", default=[], metavar="NAME=N",
                   help="new candidates for one workload (repeatable; 0 with --db: only the winners)")
    b.add_argument("--build-workers", type=int, default=2)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True, help="bundle directory")
    b.add_argument("--db", default=None, help="next round: search from the measurements and cost models of this "
                   "database (after bundle import); without it, a fresh search")
    b.add_argument("--device", default=None, metavar="ID", help="with --db: the device to continue from "
                   "(needed when the database holds several of the target's kind)")
    b.add_argument("--share", action="append", default=[], metavar="PART:SHARE[:INTERF]",
                   help="with --db: shares to search (repeatable; default: every share measured without a neighbour)")
    b.add_argument("--transfer-top", type=int, default=2, help="with --db: each share's best configs measured at "
                   "every share")
    b.add_argument("--explore", action="append", default=[], metavar="NAME=N",
                   help="add N uniform samples of the design space for a workload (repeatable; no cost model)")
    b.add_argument("--cost-model", default="random", help="ranking without data (round 1, or a share with no "
                   "saved model)")
    b.set_defaults(func=_cmd_bundle_build)
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
    r.set_defaults(func=_cmd_bundle_run)
    i = bs.add_parser("import", help="record bundle results in the database and retrain the cost models")
    i.add_argument("results", help="results directory or results.json")
    i.add_argument("--cost-model", default="xgb")
    _db_arg(i)
    i.set_defaults(func=_cmd_bundle_import)


def _cmd_bundle_build(a) -> int:
    from .bundle import build_bundle

    per_wl, explore = {}, {}
    for opt, items, into in (("--workload-candidates", a.workload_candidates, per_wl),
                             ("--explore", a.explore, explore)):
        for item in items:
            name, sep, n = item.rpartition("=")
            if not sep or not name or not n.strip().isdigit():
                raise ConfigError(f"{opt} {item!r}: expected NAME=N, e.g. mm_1024=8")
            into[name] = int(n)
    m = build_bundle(a.space, a.workload, a.out, candidates=a.candidates, target=a.target, arch=a.arch, seed=a.seed,
                     build_workers=a.build_workers, cost_model=a.cost_model, db_path=a.db, device_id=a.device,
                     shares=a.share, workload_candidates=per_wl, transfer_top=a.transfer_top,
                     explore=explore)
    built = sum(c["status"] == "ok" for c in m["candidates"])
    print(f"bundle {a.out}: {built}/{len(m['candidates'])} candidates built for {m['arch']} "
          f"({', '.join(m['workloads'])}) in {m['build_s']} s")
    if "round" in m:
        r = m["round"]
        for wk, info in r["workloads"].items():
            print(f"  {wk}: from {info['measured']} measurements on {r['device']} [{r['device_id']}]: "
                  f"{info['new']} new, {info.get('explore', 0)} uniform samples, {info['transfer']} winners to "
                  f"measure at other shares, {info['best']} winners re-measured")
    return 0


def _cmd_bundle_run(a) -> int:
    from .bundle import conditions_from, format_table, parse_condition, run_bundle
    from .partition import parse_ratios

    if a.condition:
        conds = [parse_condition(c) for c in a.condition]
    else:
        conds = conditions_from(a.partition, parse_ratios(a.ratios), [s.strip() for s in a.interference.split(",")])
    res = run_bundle(a.bundle, a.out, conds, repeat=a.repeat, min_repeat_ms=a.min_repeat_ms, timeout=a.timeout,
                     top=a.top, seed=a.seed, vendor=a.vendor)
    print(format_table(res))
    return 0


def _cmd_bundle_import(a) -> int:
    from .bundle import import_results

    with _open_db(a.db, create=True) as db:
        s = import_results(a.results, db, cost_model=a.cost_model)
    print(f"imported {s['added']} measurements ({s['skipped']} already there) for {s['device']} [{s['device_id']}] "
          f"into {a.db or 'the default database'}; retrained {s['cost_models']} cost models; "
          f"{s['baselines']} cuBLAS baselines")
    return 0


# ---------------------------------------------------------------- main

COMMANDS: list[Callable] = [_add_tune, _add_workloads, _add_show]
COMMANDS += [_add_lookup, _add_report, _add_db]
COMMANDS += [_add_bundle]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="spatialtune", description="Partial-resource kernel auto-tuner")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("-v", "--verbose", action="store_true", help="info logs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    level = logging.DEBUG if a.debug else logging.INFO if a.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # MetaSchedule logs every evolution round at INFO; keep it for --debug.
    logging.getLogger("tvm").setLevel(logging.DEBUG if a.debug else logging.WARNING)
    if not getattr(a, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return a.func(a) or 0
    except SpatialtuneError as e:
        if a.debug:
            raise
        return _fail(str(e))
    except KeyboardInterrupt:
        print("spatialtune: interrupted; everything measured so far is in the database", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `spatialtune show | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
