"""Search quality on this machine: spatialtune vs MetaSchedule's own tune_tir (its own design
spaces, the same target) vs uniform sampling of spatialtune's design space, at equal trials and
at equal wall time, over several seeds (``--seeds``), with every method given the same
information, cores and measurement conditions (see docs/search.md, *The benchmark*).

Per seed, workload and share (the shares in ``--ratios`` this machine can grant as distinct core
counts, largest first): every method gets the largest trial budget. At a later share spatialtune
tunes into the database its earlier shares filled (transfer) and tune_tir starts from the JSON
database its own earlier shares filled (warm start); ``spatialtune-scratch`` and
``tune_tir-scratch`` start empty. A method's pick at B trials or W seconds is its fastest kernel
among those measured by then, by their first measurements; the picks are built again and
re-measured by spatialtune's runner in one final pass of rounds, each round every pick, then numpy
and (matmul family) ONNX Runtime on the same cores. Ablations: ``spatialtune-nolocal`` (no
neighbours of the best kernels), ``spatialtune-nopack`` (no packed-panel space),
``spatialtune-notile`` (no register-tile seeds); ``tune_tir-stock``: tune_tir with its own runner.

Results go to --out/seed<N>/ as JSON per (workload, share, method), so an interrupted run
resumes; the tables are printed at the end (and with --table-only from what is there). Nothing
is asserted.
"""
from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from bench_search_methods import (ABLATIONS, measure_onnxruntime, onnx_model, run_spatialtune,  # noqa: E402
                                  run_tune_tir, run_uniform)
from bench_search_stats import (FAMILIES, best_after, best_by_wall, common_bar, job_cost,  # noqa: E402
                                med, reach, spread, trials_to_95, vs_vendor)
from spatialtune.device import describe_machine, detect_cpu, target_for  # noqa: E402
from spatialtune.measure.builder import BuildInput, LocalBuilder  # noqa: E402
from spatialtune.measure.runner import LocalRunner, RunInput, RunSettings  # noqa: E402
from spatialtune.partitions.cpu import CpuPartition  # noqa: E402
from spatialtune.workloads.spec import load_space  # noqa: E402

log = logging.getLogger("bench-search")

FULL = ["bert_qkv_fp32", "r50_s2_3x3_fp32", "mbv2_dw_144_56_fp32", "bert_qk_fp32"]
QUICK = ["dense_small"]
DEFAULT_METHODS = "spatialtune,tune_tir,uniform"
SPACES = ["bert_base.toml", "resnet50.toml", "mobilenet_v2.toml", "demo.toml"]
MATMUL_FAMILY = ("dense", "matmul", "batch_matmul")
FINAL_ROUNDS = 5  # rounds of the final pass
QUICK_RUN = RunSettings(repeat=2, min_repeat_ms=5, warmup_ms=10, timeout=60)
PROTOCOL = 2  # finals without it picked from confirmed medians, one seed, tune_tir's stock runner


def find_workload(name: str):
    for f in SPACES:
        for w in load_space(ROOT / "search_spaces" / f).workloads:
            if name in (w.name, w.key):
                return w
    raise SystemExit(f"no workload {name!r} in {', '.join(SPACES)}")


def distinct_shares(part, ratios: list[float]) -> list[float]:
    """The ratios, largest first, that grant a core count no larger ratio already grants."""
    out, seen = [], set()
    for r in sorted(ratios, reverse=True):
        units = part.grant(r).units
        if units not in seen:
            seen.add(units)
            out.append(r)
    return out


def final_pass(w, share, traces: list[str], art: Path, runner: LocalRunner, rounds: int, vendor: bool,
               model: Path | None, seed: int) -> tuple[list[list[float | None]], list, list]:
    """Each config built again and measured by spatialtune's runner under ``share`` in ``rounds``
    rounds, each round every config, then (``vendor``) numpy and ONNX Runtime (``model``) on the
    same cores: (per config its time in each round, numpy's and ORT's time in each round). The
    host drifts over a minute; a ratio between two times of one round is what holds still."""
    import tvm

    from spatialtune.workloads.schedule import apply_trace

    target = target_for(detect_cpu(), share.units)
    mods = [tvm.ir.save_json(apply_trace(w, t).mod) for t in traces]
    with LocalBuilder(art) as b:
        built = b.build([BuildInput(m, f"re{i}") for i, m in enumerate(mods)], target)
    times: list[list[float | None]] = [[] for _ in traces]
    numpy_s, ort_s = [], []
    for _ in range(rounds):
        res = runner.run(share, "none", [RunInput(w.to_dict(), x.artifact) for x in built])
        for i, r in enumerate(res):
            times[i].append(r.median_s if r.status == "ok" else None)
        if vendor:
            r = runner.measure_baseline(share, "none", w.to_dict(), "numpy")
            numpy_s.append(r.median_s if r.status == "ok" else None)
        if vendor and model is not None:
            ort_s.append(measure_onnxruntime(runner, share, w, model, seed))
    return times, numpy_s, ort_s


def run_cell(w, ratio, prev_ratio, methods, budgets, walls, seed, sdir: Path, work: Path, runner, part, settings,
             a, quick) -> None:
    """Every method at one (workload, share, seed), then the final pass of their picks."""
    share = part.grant(ratio)
    tag = f"{w.name}@{share.key_ratio:g}"
    first = prev_ratio is None
    n = budgets[-1]

    def tt_dir(r):
        return sdir / f"{w.name}@{part.grant(r).key_ratio:g}-tune_tir-db"

    runs = {"spatialtune": lambda: run_spatialtune(w, ratio, sdir / f"{w.name}.sqlite", n, seed, work / "art",
                                                   settings, a.diversity, quick)}
    for abl, opt in ABLATIONS.items():  # each in its own database
        runs[f"spatialtune-{abl}"] = (lambda abl=abl, opt=opt: run_spatialtune(
            w, ratio, sdir / f"{w.name}-{abl}.sqlite", n, seed, work / "art", settings, a.diversity, quick, **opt))
    runs |= {"uniform": lambda: run_uniform(w, share, n, seed, work / "art", runner),
             "tune_tir": lambda: run_tune_tir(w, share, n, seed, tt_dir(ratio), settings,
                                              warm_from=None if first else tt_dir(prev_ratio)),
             "tune_tir-stock": lambda: run_tune_tir(w, share, n, seed, work / f"{tag}-stock", settings, stock=True),
             "spatialtune-scratch": lambda: run_spatialtune(w, ratio, sdir / f"{w.name}-scratch-{ratio:g}.sqlite",
                                                            n, seed, work / "art", settings, a.diversity, quick),
             "tune_tir-scratch": lambda: run_tune_tir(w, share, n, seed, work / f"{tag}-tt-scratch", settings)}
    todo = list(methods)
    if not first:  # the same searches from an empty database: what the earlier shares' data is worth
        todo += [m for m in ("spatialtune-scratch", "tune_tir-scratch") if m.split("-")[0] in methods]
    if quick and not first:  # the ablations and the stock runner have run once: enough for a smoke test
        todo = [m for m in todo if m.removeprefix("spatialtune-") not in ABLATIONS and m != "tune_tir-stock"]
    for m in todo:
        f = sdir / f"{tag}-{m}.json"
        if f.exists():
            continue
        log.info("%s seed %d: %s, %d trials", tag, seed, m, n)
        t0 = time.perf_counter()
        res = runs[m]()
        f.write_text(json.dumps(res | {"wall_s": time.perf_counter() - t0}))
        log.info("%s seed %d: %s done in %.0f s", tag, seed, m, time.perf_counter() - t0)
    final = sdir / f"{tag}-final.json"
    if final.exists():
        return
    results = {m: json.loads((sdir / f"{tag}-{m}.json").read_text()) for m in todo}
    have = {m: r["rows"] for m, r in results.items()}
    picks = []  # (method, budget kind, budget, trace)
    for m, rows in have.items():
        for b in budgets:
            if (p := best_after(rows, b)) is not None:
                picks.append((m, "budget", b, p["trace"]))
        for s in walls:
            if (p := best_by_wall(rows, s)) is not None:
                picks.append((m, "wall", s, p["trace"]))
    traces = sorted({p[3] for p in picks})  # one build and one measurement per distinct kernel
    vendor = w.op in MATMUL_FAMILY
    model = onnx_model(w, work / f"{w.name}.onnx") if vendor else None
    log.info("%s seed %d: re-measuring %d configs, numpy and ONNX Runtime", tag, seed, len(traces))
    times, ns, orts = final_pass(w, share, traces, work / "art", runner, 1 if quick else FINAL_ROUNDS, vendor,
                                 model, seed)
    by_trace = dict(zip(traces, times))
    # the bar of the whole-job table: the fastest final pick at this share, re-measured in the final
    # pass (the best single first measurement could be a lucky one that no other method reaches)
    bar = common_bar({m: [{"t": med(by_trace[tr])} for mm, kind, b, tr in picks if mm == m and kind == "budget"
                          and b == n] for m in have})
    final.write_text(json.dumps({
        "protocol": PROTOCOL, "seed": seed, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
        "workload": w.name, "key": w.key, "op": w.op, "flops": w.flops, "ratio": share.key_ratio,
        "units": share.units, "numpy_s": med(ns), "numpy_rounds": ns, "ort_s": med(orts), "ort_rounds": orts,
        "picks": [{"method": m, kind: b, "t": med(by_trace[tr]), "rounds": by_trace[tr]} for m, kind, b, tr in picks],
        "t95": {m: trials_to_95(rows) for m, rows in have.items()},
        "bar_s": bar, "reach": {m: reach(rows, bar) if bar else None for m, rows in have.items()},
        "wall_s": {m: r["wall_s"] for m, r in results.items()}, "trials": {m: len(rows) for m, rows in have.items()},
        "timings": {m: r["timings"] for m, r in results.items() if r.get("timings")},
        "warm": {m: {"records": r["warm_records"], "picked_from_db": r["picked_from_db"]}
                 for m, r in results.items() if "warm_records" in r}}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="64,128,256", help="trial budgets")
    ap.add_argument("--walls", default="300,600,1200", help="wall-clock budgets, seconds")
    ap.add_argument("--workloads", default=",".join(FULL))
    ap.add_argument("--ratios", default="100,50,25", help="shares, tuned largest first (duplicate core counts skipped)")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--diversity", type=float, default=None,
                    help="spatialtune's novelty weight when it picks a batch (default: tune's; 0: the ablation)")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench-search"))
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="one small workload at 100 and 50 %%, one seed, budgets 2 and 4, every method (a smoke test)")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the cleanup of child processes runs
    quick = a.quick or bool(os.environ.get("SPATIALTUNE_QUICK"))
    if quick:  # two shares, so transfer and the warm-started tune_tir run too
        a.budgets, a.walls, a.workloads, a.ratios, a.seeds = "2,4", "5,10", ",".join(QUICK), "100,50", "0"
        if a.methods == DEFAULT_METHODS:  # and the ablations, so every method of the script runs
            a.methods += "," + ",".join([f"spatialtune-{abl}" for abl in ABLATIONS] + ["tune_tir-stock"])
        a.out = a.out if a.out != str(ROOT / "out" / "bench-search") else tempfile.mkdtemp(prefix="bench-search-")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("tvm").setLevel(logging.WARNING)
    logging.getLogger("spatialtune").setLevel(logging.WARNING)
    budgets = sorted(int(b) for b in a.budgets.split(","))
    walls = sorted(float(s) for s in a.walls.split(","))
    methods = a.methods.split(",")
    out = Path(a.out)
    if a.table_only:  # the figure in the docs: from the committed results, nothing measured
        print(table(out, budgets, walls))
        return 0
    part = CpuPartition()
    ratios = distinct_shares(part, [float(r) for r in a.ratios.split(",")])
    settings = QUICK_RUN if quick else RunSettings(repeat=5, min_repeat_ms=20, timeout=60)
    work = Path(tempfile.mkdtemp(prefix="bench-search-work-"))  # built kernels: hundreds of MB at full size
    atexit.register(shutil.rmtree, work, True)
    with LocalRunner(part, settings=settings) as runner:
        for seed in (int(s) for s in a.seeds.split(",")):
            sdir = out / f"seed{seed}"
            sdir.mkdir(parents=True, exist_ok=True)
            for name in a.workloads.split(","):
                w = find_workload(name)
                for i, ratio in enumerate(ratios):
                    run_cell(w, ratio, ratios[i - 1] if i else None, methods, budgets, walls, seed, sdir, work,
                             runner, part, settings, a, quick)
    print(table(out, budgets, walls))
    return 0


def machine() -> str:
    return describe_machine()


# ---------------------------------------------------------------- tables


def load_finals(out: Path) -> dict[tuple, list[dict]]:
    """The finals under ``out`` (per seed under seed<N>/; older results flat, one seed) by
    (workload, share), the larger share first."""
    files = sorted(out.glob("seed*/*-final.json")) or sorted(out.glob("*-final.json"))
    cells: dict[tuple, list[dict]] = {}
    for f in files:
        d = json.loads(f.read_text())
        if "seed" not in d and f.parent.name.startswith("seed"):  # older results: the seed is the folder's
            d["seed"] = int(f.parent.name[4:])
        cells.setdefault((d["workload"], -d["ratio"]), []).append(d)
    return {k: cells[k] for k in sorted(cells)}


def _by(d: dict, kind: str) -> dict[str, dict]:
    """method -> budget -> pick of one final (kind: "budget" for trials, "wall" for seconds)."""
    out: dict[str, dict] = {}
    for p in d["picks"]:
        if kind in p:
            out.setdefault(p["method"], {})[p[kind]] = p
    return out


def _cell(xs: list) -> str:
    m, s = med([x * 1e3 if x else None for x in xs]), spread(xs)
    if m is None:
        return f"{'-':>14}"
    return f"{m:>8.3f}ms" + (f"±{100 * s:>2.0f}%" if s is not None else "    ")


def _methods(ds: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for d in ds:
        for p in d["picks"]:
            seen.setdefault(p["method"], None)
    return list(seen)


def _wall_label(s: float) -> str:
    return f"{s / 60:g}min" if s >= 60 else f"{s:g}s"


def table(out: Path, budgets: list[int], walls: list[float]) -> str:
    """The tables of the results under ``out``, with the machine and dates they were measured on."""
    cells = load_finals(out)
    ds_all = [d for ds in cells.values() for d in ds]
    where = sorted({f"{d.get('machine', '?')}, {d.get('date', '?')}" for d in ds_all})
    seeds = sorted({d.get("seed", 0) for d in ds_all})
    lines = [f"measured on: {'; '.join(where) or machine()}; seeds {','.join(map(str, seeds)) or '-'}"]
    if any(d.get("protocol", 1) < PROTOCOL for d in ds_all):
        lines.append("protocol 1 (older results): picks from medians that include confirmations made after the "
                     "search, one seed, tune_tir with MetaSchedule's stock runner, confined with its builder to the "
                     "share, and starting empty at 50 % while spatialtune had the 100 % share's database")
    hdr = (f"{'workload':<22} {'share':>6} {'method':<20} " + " ".join(f"{'best@' + str(b):>14}" for b in budgets)
           + f" {'GFLOP/s':>8} {'vs vendor':>9} {'t95':>5} {'wall s':>7} {'trials/s':>8}")
    lines += ["", "equal trials (median over seeds ± half their range):", hdr, "-" * len(hdr)]
    for (wl, _), ds in cells.items():
        by = [_by(d, "budget") for d in ds]
        for m in _methods(ds):
            row = " ".join(_cell([b.get(m, {}).get(n, {}).get("t") for b in by]) for n in budgets)
            last = med([b.get(m, {}).get(budgets[-1], {}).get("t") for b in by])
            gf = ds[0]["flops"] / last / 1e9 if last else float("nan")
            r = med([vs_vendor(d, b[m][budgets[-1]]) if budgets[-1] in b.get(m, {}) else None
                     for d, b in zip(ds, by)])
            t95 = med([d["t95"].get(m) for d in ds])
            wall = med([d["wall_s"].get(m) for d in ds])
            tps = med([d["trials"][m] / d["wall_s"][m] if d.get("trials", {}).get(m) and d["wall_s"].get(m) else None
                       for d in ds])
            lines.append(f"{wl:<22} {ds[0]['ratio']:>5g}% {m:<20} {row} {gf:>8.1f} "
                         f"{f'{r:.2f}x' if r else '-':>9} {f'{t95:.0f}' if t95 else '-':>5} {wall or 0:>7.0f} "
                         f"{f'{tps:.2f}' if tps else '-':>8}")
        for name, k in (("numpy", "numpy_s"), ("onnxruntime", "ort_s")):
            if med([d.get(k) for d in ds]):
                lines.append(f"{'':<22} {'':>6} {name:<20} {_cell([d.get(k) for d in ds])} "
                             f"(same {ds[0]['units']} core{'s' if ds[0]['units'] > 1 else ''})")
    if any("wall" in p for d in ds_all for p in d["picks"]):
        hdr = f"{'workload':<22} {'share':>6} {'method':<20} " + " ".join(
            f"{'best@' + _wall_label(s):>14}" for s in walls)
        lines += ["", "equal wall time (from each method's start; median over seeds):", hdr, "-" * len(hdr)]
        for (wl, _), ds in cells.items():
            by = [_by(d, "wall") for d in ds]
            for m in _methods(ds):
                lines.append(f"{wl:<22} {ds[0]['ratio']:>5g}% {m:<20} " + " ".join(
                    _cell([b.get(m, {}).get(s, {}).get("t") for b in by]) for s in walls))
    lines += job_table(cells) + timing_table(ds_all) + verdicts(cells, budgets, walls)
    lines.append(
        "best@B: the fastest kernel among a method's first B trials (best@T: measured within T of its start), by "
        "their first measurements, re-measured by spatialtune's runner in one final pass (the median of its "
        "rounds); vs vendor > 1: faster than the faster of numpy (OpenBLAS) and ONNX Runtime on the same cores "
        "(the median of the rounds' ratios); t95: trials to 95 % of the method's final best; -scratch: the share "
        "tuned from an empty database (spatialtune and tune_tir at a later share otherwise start from their "
        "earlier shares' databases); -stock: MetaSchedule's own runner")
    return "\n".join(lines)


def job_table(cells: dict[tuple, list[dict]]) -> list[str]:
    """The cost of tuning a workload at every share: trials and seconds until each share has a
    kernel (by its first measurement) within 95 % of the fastest final pick any method made
    there (median over seeds)."""
    by_wl: dict[str, dict[int, list[dict]]] = {}
    for (wl, _), ds in cells.items():
        for d in ds:
            if d.get("protocol", 1) >= PROTOCOL:
                by_wl.setdefault(wl, {}).setdefault(d.get("seed", 0), []).append(d)
    if not by_wl:
        return []
    lines = ["", "the whole job: trials and seconds until every share has a kernel within 95 % of the fastest "
                 "final pick there (median over seeds):"]
    for wl, per_seed in by_wl.items():
        costs = [job_cost(sorted(fs, key=lambda d: -d["ratio"])) for fs in per_seed.values()]
        shares = "/".join(f"{d['ratio']:g}%" for d in sorted(next(iter(per_seed.values())), key=lambda d: -d["ratio"]))
        for fam in FAMILIES:
            got = [c[fam] for c in costs]
            if all(g is None for g in got):
                txt = "not reached"
            else:
                n, s = med([g[0] if g else None for g in got]), med([g[1] if g else None for g in got])
                txt = f"{n:.0f} trials, {s:.0f} s" + (f" (not reached in {sum(g is None for g in got)} seeds)"
                                                      if None in got else "")
            lines.append(f"  {wl} {shares}: {fam:<20} {txt}")
    return lines


def timing_table(ds_all: list[dict]) -> list[str]:
    """Where spatialtune's time went (``TuneSummary.timings``), summed over its runs."""
    tot: dict[str, dict[str, float]] = {}
    for d in ds_all:
        for m, t in d.get("timings", {}).items():
            for k in ("search", "build", "run", "train"):
                tot.setdefault(m, {}).setdefault(k, 0.0)
                tot[m][k] += float(t.get(k, 0.0))
    lines = ["", "where spatialtune's time went (all its runs):"] if tot else []
    for m, t in tot.items():
        s = sum(t.values()) or 1.0
        lines.append(f"  {m:<20} " + ", ".join(f"{k} {100 * v / s:.0f} %" for k, v in t.items()))
    return lines


def verdicts(cells: dict[tuple, list[dict]], budgets: list[int], walls: list[float]) -> list[str]:
    """One line per question the benchmark exists to answer, on the medians over seeds."""
    out = ["", "verdicts (median over seeds; spread: half the range of the seeds' ratios):"]
    pairs = [("spatialtune", ("tune_tir", "uniform", "tune_tir-stock")),
             ("spatialtune-scratch", ("tune_tir-scratch",))]
    for (wl, _), ds in cells.items():
        head = f"  {wl} {ds[0]['ratio']:g}%"
        for kind, points in (("budget", budgets), ("wall", walls)):
            by = [_by(d, kind) for d in ds]
            for n in points:
                at = f"@{n}" if kind == "budget" else f"@{_wall_label(n)}"
                for mine, rivals in pairs:
                    for rv in rivals:
                        rs = [b[mine][n]["t"] / b[rv][n]["t"] for b in by if n in b.get(mine, {}) and
                              n in b.get(rv, {}) and b[mine][n]["t"] and b[rv][n]["t"]]
                        if rs:
                            r, s = med(rs), spread(rs)
                            out.append(f"{head} {at}: {mine} {'ahead of' if r < 1 else 'behind'} {rv}: "
                                       f"{r:.2f}x its time" + (f" (±{100 * s:.0f} %)" if s is not None else ""))
        by = [_by(d, "budget") for d in ds]
        for abl, what in (("nolocal", "neighbours of the best kernels"), ("nopack", "the packed-panel space"),
                          ("notile", "register-tile seeds")):
            rs = [b["spatialtune"][budgets[-1]]["t"] / b[f"spatialtune-{abl}"][budgets[-1]]["t"] for b in by
                  if budgets[-1] in b.get("spatialtune", {}) and budgets[-1] in b.get(f"spatialtune-{abl}", {})
                  and b["spatialtune"][budgets[-1]]["t"] and b[f"spatialtune-{abl}"][budgets[-1]]["t"]]
            if rs:
                out.append(f"{head} @{budgets[-1]}: with {what} {med(rs):.2f}x the time without them")
        rs = [vs_vendor(d, b["spatialtune"][budgets[-1]]) for d, b in zip(ds, by)
              if budgets[-1] in b.get("spatialtune", {})]
        if med(rs):
            out.append(f"{head}: spatialtune at {budgets[-1]} trials is {med(rs):.2f}x the faster vendor anchor "
                       "on the same cores")
        warm = [w for d in ds if (w := d.get("warm", {}).get("tune_tir")) and w["records"]]
        for w in warm[:1]:
            out.append(f"{head}: tune_tir started from {w['records']} records of its earlier shares; MetaSchedule "
                       f"picked {w['picked_from_db'][0] if w['picked_from_db'] else '?'} of them for its first "
                       "population")
    return out


if __name__ == "__main__":
    sys.exit(main())
