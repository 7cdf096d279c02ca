"""Commands to tune and to read what was tuned: ``tune``, ``workloads``, ``show``."""

from __future__ import annotations

import json

from ..distributed.tracker import START_WAIT_S
from ..errors import ConfigError
from ..tuning.options import TuneOptions
from .common import db_arg, open_db


def add_tune(sub) -> None:
    p = sub.add_parser("tune", help="tune workloads for shares of the device")
    _what_to_tune(p)
    _how_to_measure(p)
    _servers_elsewhere(p.add_argument_group("measuring on servers elsewhere (docs/distributed.md)"))
    _search(p.add_argument_group("search"))
    db_arg(p)
    p.set_defaults(func=_cmd_tune)


def _what_to_tune(p) -> None:
    """The workloads, shares and condition, and how much to spend on them."""
    p.add_argument("--space", required=True, help="search-space file (search_spaces/*.toml)")
    p.add_argument("--workload", action="append", default=[], metavar="NAME",
                   help="workload name or key (repeatable; default: all in the space)")
    p.add_argument("--ratios", default="100", help="shares to tune for, percent, e.g. 25,50,100")
    p.add_argument("--interference", default="none",
                   help="none, cold (each run after the caches were emptied, a model task's activations written "
                        "back; CPU), compute, memory or tenant:WORKLOAD")
    p.add_argument("--trials", type=int, default=32,
                   help="trials per (workload, share), earlier runs included; for a model's space (--scheduler "
                        "gradient), per share across its tasks")
    p.add_argument("--scheduler", choices=("each", "gradient"), default=None,
                   help="each: --trials for every (workload, share); gradient: --trials per share spent across "
                        "the tasks where weight x time is (default: gradient for a model's space, else each)")
    p.add_argument("--batch", type=int, default=TuneOptions.batch, help="candidates built and measured per round")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS", help="stop after this long")


def _how_to_measure(p) -> None:
    """Where and how candidates are built and timed."""
    p.add_argument("--target", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--partition", default=None, help="cpu (default for --target cpu), mps or green")
    p.add_argument("--cost-model", default="xgb", help="xgb or random")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per candidate measurement")
    p.add_argument("--repeat", type=int, default=5, help="timed repeats per candidate (median counts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baselines", action="store_true", help="skip TVM-default and numpy baselines")
    p.add_argument("--build-workers", type=int, default=None, help="parallel build processes (default: one per core)")
    p.add_argument("--build-deadline", type=float, default=TuneOptions.build_deadline, metavar="X",
                   help="cut a build that takes over X times its workload's median build "
                        f"(default {TuneOptions.build_deadline:g}; 0: never)")


def _servers_elsewhere(r) -> None:
    r.add_argument("--tracker", default=None, metavar="HOST:PORT",
                   help="measure on the `spatialtune serve` servers registered with this TVM RPC tracker")
    r.add_argument("--key", default=None, help="with --tracker: the servers' key (one per device model)")
    r.add_argument("--rpc-timeout", type=float, default=None, metavar="SECONDS",
                   help="with --tracker: limit of one measurement request once a server has it "
                        "(default: --timeout plus 60 s)")
    r.add_argument("--server-wait", type=float, default=START_WAIT_S, metavar="SECONDS",
                   help="with --tracker: how long to wait for the tracker to listen and a first server "
                        f"to register (default {START_WAIT_S:g})")


def _search(s) -> None:
    """How the search proposes candidates and carries kernels between shares."""
    s.add_argument("--population", type=int, default=TuneOptions.population, help="evolution's population")
    s.add_argument("--genetic-iters", type=int, default=TuneOptions.genetic_iters, help="generations per batch")
    s.add_argument("--explore", type=float, default=TuneOptions.explore,
                   help="fraction of every batch sampled uniformly from the design space")
    s.add_argument("--local", type=float, default=TuneOptions.local,
                   help="fraction of every batch that are random single mutations of the share's fastest kernels")
    s.add_argument("--diversity", type=float, default=TuneOptions.diversity,
                   help="weight of new knob values when a batch is picked from the best-predicted candidates "
                        "(0: the top ones)")
    s.add_argument("--no-pack-panels", action="store_true",
                   help="CPU: search MetaSchedule's own design spaces only, without the one that packs a "
                        "matmul's transposed operand into vector-wide panels")
    s.add_argument("--tile-seeds", type=int, default=TuneOptions.tile_seeds, metavar="N",
                   help="CPU: candidates of a share's first batches drawn with a register-sized innermost tile "
                        "(0: none)")
    s.add_argument("--search-threads", type=int, default=None, metavar="N",
                   help="threads of the evolution (default: this process's cores); 1 makes a search "
                        "reproducible from its seed and its measurements")
    s.add_argument("--matrix-top", type=int, default=TuneOptions.matrix_top, metavar="N",
                   help="after a workload's shares: each condition's N fastest kernels measured under every other "
                        "(the winners matrix; 0 keeps only the best of each)")
    s.add_argument("--transfer-top", type=int, default=TuneOptions.transfer_top,
                   help="configs of each other share measured first at a new share")
    s.add_argument("--mcpu", default=None, help="CPU: LLVM CPU to compile for (default: this machine's)")
    s.add_argument("--arch", default=None, help="CUDA: sm_XY to compile for (default: the device's)")


def _cmd_tune(a) -> int:
    from ..measure.runner import RunSettings
    from ..terms import parse_ratios
    from ..tuning import tune
    from ..workloads.spec import load_space
    from .progress import Progress

    ratios = parse_ratios(a.ratios)
    space = load_space(a.space)
    workloads = space.select(a.workload)
    scheduler = a.scheduler or ("gradient" if all(w.prim is not None for w in workloads) else "each")
    if a.timeout <= 0 or a.repeat < 1:
        raise ConfigError("--timeout must be positive and --repeat at least 1")
    opts = TuneOptions(trials=a.trials, batch=a.batch, scheduler=scheduler, time_budget_s=a.time_budget, target=a.target,
                       partition=a.partition, interference=a.interference, cost_model=a.cost_model, seed=a.seed,
                       baselines=not a.no_baselines, build_workers=a.build_workers, population=a.population,
                       genetic_iters=a.genetic_iters, explore=a.explore, local=a.local, diversity=a.diversity,
                       pack_panels=not a.no_pack_panels, tile_seeds=a.tile_seeds,
                       search_threads=a.search_threads, build_deadline=a.build_deadline or None,
                       transfer_top=a.transfer_top, matrix_top=a.matrix_top, mcpu=a.mcpu,
                       arch=a.arch, run=RunSettings(repeat=a.repeat, timeout=a.timeout, seed=a.seed))
    opts.validate()
    with _runner(a, opts) as runner, open_db(a.db, create=True) as db:
        bar = Progress(total_jobs=(1 if scheduler == "gradient" else len(workloads)) * len(ratios))
        try:
            summary = tune(workloads, ratios, db, opts, progress=bar.update, runner=runner)
        finally:
            bar.close()
    from .tables import format_summary

    print(format_summary(summary))
    return 0


def _runner(a, opts: TuneOptions):
    """With --tracker, the servers' runner (which checks the tracker and the key at once);
    otherwise none: ``tune`` measures on this machine."""
    import contextlib

    if a.tracker is None:
        for flag, value in (("--key", a.key), ("--rpc-timeout", a.rpc_timeout)):
            if value is not None:
                raise ConfigError(f"{flag} needs --tracker HOST:PORT")
        return contextlib.nullcontext(None)
    if not a.key:
        raise ConfigError("--tracker needs --key KEY (the key the servers registered with)")
    from ..distributed.runner import RpcRunner

    return RpcRunner(a.tracker, a.key, settings=opts.run, rpc_timeout=a.rpc_timeout, first_wait_s=a.server_wait)


# ---------------------------------------------------------------- workloads, show


def add_workloads(sub) -> None:
    p = sub.add_parser("workloads", help="list the workload keys of a search space, or extract a model's tasks "
                                         "into one")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--space", help="search-space file or shipped space to list")
    src.add_argument("--from-onnx", action="append", metavar="MODEL.onnx",
                     help="extract the tuning tasks of an ONNX model (repeatable: one space for several models)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=D1,D2,...",
                   help="static shape of a model input, e.g. x=1,3,224,224 (repeatable)")
    p.add_argument("--out", metavar="SPACE.toml", help="with --from-onnx: write the space there (default: print it)")
    p.add_argument("--name", help="with --from-onnx: the space's name (default: the models' names)")
    p.add_argument("--layout", default=None,
                   help="with --from-onnx: the convolutions' layout: auto (default: blocked by this CPU's fp32 "
                        "vector width when every convolution takes it, large 3x3 ones as Winograd), nchw, or "
                        "NCHW<b>c: blocked by b output channels, as ONNX Runtime runs them, optionally +winograd "
                        "(docs/models.md)")
    p.add_argument("--exact-math", action="store_true",
                   help="with --from-onnx: build every task with exact erf/exp/tanh (default: vectorisable "
                        "approximations on a CPU where a task's output check passes with them)")
    p.set_defaults(func=_cmd_workloads)


def _cmd_workloads(a) -> int:
    from ..workloads.spec import load_space

    if a.from_onnx:
        from ..models.importer import parse_shapes, space_from_onnx

        text, workloads = space_from_onnx(a.from_onnx, parse_shapes(a.shape), a.name, fast_math=not a.exact_math,
                                           layout=a.layout or "auto")
        if not a.out:
            print(text)
            return 0
        try:
            with open(a.out, "w") as f:
                f.write(text)
        except OSError as e:
            raise ConfigError(f"--out {a.out}: cannot write it ({e.strerror})") from None
        load_space(a.out)  # what was written reads back as the same tasks (hashes checked)
        _list(workloads)
        print(f"{len(workloads)} tasks written to {a.out}")
        return 0
    if a.shape or a.out or a.name or a.exact_math or a.layout:
        raise ConfigError("--shape, --out, --name, --layout and --exact-math go with --from-onnx")
    _list(load_space(a.space).workloads)
    return 0


def _list(workloads) -> None:
    for w in workloads:
        if w.prim is not None:
            shape = f"weight={w.weight} model={w.model}"
        else:
            shape = " ".join(f"{k}={v}" for k, v in w.params.items())
        print(f"{w.key}\t{w.name}\t{w.op}\t{w.dtype}\t{shape}\t{w.flops / 1e9:.3f} GFLOP")


def add_show(sub) -> None:
    p = sub.add_parser("show", help="best config per (workload, share, interference, device)")
    db_arg(p)
    p.add_argument("--workload", action="append", default=[], metavar="NAME", help="name or key (repeatable)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    fmt.add_argument("--nl", action="store_true", help="newline-delimited JSON: one object per line")
    p.set_defaults(func=_cmd_show)


def _cmd_show(a) -> int:
    from .tables import format_best_table

    with open_db(a.db, create=False) as db:
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
        origin, unchecked = best_notes(db, rows)
        if a.json or a.nl:
            objs = [b.to_dict() | {"device_name": devices.get(b.device_id, {}).get("name", ""),
                                   "origin": origin.get(_key(b), ""), "unchecked_rows": unchecked.get(_key(b), 0)}
                    for b in rows]
            print("\n".join(json.dumps(o) for o in objs) if a.nl else json.dumps(objs, indent=2))
        else:
            print(format_best_table(rows, devices, db, origin))
            n = sum(unchecked.values())
            if n:
                print(f"{n} imported configs not output-checked yet (status unchecked): no answer until a tune "
                      "of their share measures them")
    return 0


def _key(b) -> tuple:
    return (b.workload_key, b.device_id, b.partition, b.ratio, b.interference)


def best_notes(db, rows) -> tuple[dict, dict]:
    """For best rows: where each key's best came from (``Origin.label``), and how many unchecked
    (imported) rows each key holds."""
    from ..search.policy import winner_origins

    origin, unchecked = {}, {}
    for wk, dev in sorted({(b.workload_key, b.device_id) for b in rows}):
        ms = db.measurements(workload_key=wk, device_id=dev)
        for part in {m.partition for m in ms}:
            for k, o in winner_origins([m for m in ms if m.partition == part]).items():
                origin[(wk, dev, k.partition_kind, k.ratio, k.interference)] = o.label()
        for m in ms:
            if m.status == "unchecked":
                key = (wk, dev, m.partition, m.ratio, m.interference)
                unchecked[key] = unchecked.get(key, 0) + 1
    return origin, unchecked
