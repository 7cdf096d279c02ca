"""Search quality at equal trial budgets on this machine: spatialtune vs MetaSchedule's own
tune_tir (MetaSchedule's own design spaces, the same target) vs uniform sampling of spatialtune's
design space (MetaSchedule's spaces and, on a CPU, the packed-panel one).

For each workload and share: every method gets the largest budget; its best config after the
first B trials (by its own measurements) is re-measured, together with numpy under the same
cores, by spatialtune's runner in one pass at the end, so the ratios come from one run on one
machine. Also the trials each method needed to reach 95 % of its final best, and for the smaller
shares spatialtune with transfer (after the whole-device share, in one database) against
spatialtune from scratch (a fresh database). Method ``spatialtune-nolocal`` is the ablation of the
batch's neighbours of the best kernels (``TuneOptions.local`` 0, its own database), and
``spatialtune-nopack`` that of the design space with packed operand panels
(``TuneOptions.pack_panels`` off, its own database), ``spatialtune-notile`` that of the
register-tile seeds (``TuneOptions.tile_seeds`` 0).

Results go to --out as JSON per (workload, share, method), so an interrupted run resumes; the
table is printed at the end (and with --table-only from what is there). Nothing is asserted.
"""
from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spatialtune.device import cpu_model, detect_cpu, target_for  # noqa: E402
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


def find_workload(name: str):
    for f in SPACES:
        for w in load_space(ROOT / "search_spaces" / f).workloads:
            if name in (w.name, w.key):
                return w
    raise SystemExit(f"no workload {name!r} in {', '.join(SPACES)}")


# ---------------------------------------------------------------- the three methods


# spatialtune without one of its parts: method spatialtune-<name> sets these TuneOptions
ABLATIONS = {"nolocal": {"local": 0.0}, "nopack": {"pack_panels": False}, "notile": {"tile_seeds": 0}}


def run_spatialtune(w, ratio: float, db_path: Path, trials: int, seed: int, art: Path,
                    diversity: float | None = None, quick: bool = False, **ablation) -> list[dict]:
    from spatialtune.store.database import TuningDatabase
    from spatialtune.tuning import TuneOptions, tune

    extra = ({} if diversity is None else {"diversity": diversity}) | ablation
    if quick:  # a smoke test of the script, not of the search: a small population, short timings
        extra |= {"population": 32, "genetic_iters": 1, "run": QUICK_RUN}
    with TuningDatabase(db_path) as db:
        s = tune([w], [ratio], db, TuneOptions(trials=trials, seed=seed, baselines=False, artifact_dir=str(art),
                                               **extra))
        kr = s.results[0].ratio
        rows = [m for m in db.measurements(workload_key=w.key, ratio=kr)]
    return [{"trace": m.trace, "t": m.median_s if m.status == "ok" else None, "source": m.source} for m in rows]


def run_uniform(w, share, trials: int, seed: int, art: Path, runner: LocalRunner) -> list[dict]:
    from spatialtune.search.uniform import UniformSampler

    target = target_for(detect_cpu(), share.units)
    cands = UniformSampler(w, target, seed=seed).sample(trials)
    out = []
    with LocalBuilder(art) as b:
        for i in range(0, len(cands), 16):
            chunk = cands[i:i + 16]
            built = b.build([BuildInput.of(c, w.key) for c in chunk], target)
            ok = [j for j, x in enumerate(built) if x.ok]
            res = runner.run(share, "none", [RunInput(w.to_dict(), built[j].artifact) for j in ok])
            times = dict(zip(ok, res))
            for j, c in enumerate(chunk):
                r = times.get(j)
                out.append({"trace": c.trace, "t": r.median_s if r is not None and r.status == "ok" else None,
                            "source": "uniform"})
    return out


TUNE_TIR = r"""
import json, os, sys, tempfile, time
import numpy as np
import tvm
from tvm.s_tir import meta_schedule as ms
from spatialtune.workloads.spec import Workload


def register_cpu_intrinsics():
    # MetaSchedule's default_build imports all of tvm.s_tir.tensor_intrin (15-35 s here, mostly
    # the CUDA families) in every fresh worker of every build() call; registering only the CPU
    # families first (0.5 s) makes that import a no-op. Its search and its builds are unchanged.
    from spatialtune.workloads.schedule import ensure_tensor_intrinsics

    ensure_tensor_intrinsics("llvm")


register_cpu_intrinsics()
w = Workload.from_dict(json.loads(sys.argv[1]))
target = tvm.target.Target(json.loads(sys.argv[2]))
trials, out = int(sys.argv[3]), sys.argv[4]
wd = tempfile.mkdtemp()
db = ms.tune_tir(w.ir_module(), target, wd, max_trials_global=trials, num_trials_per_iter=16,
                 builder=ms.builder.LocalBuilder(timeout_sec=300, max_workers=len(os.sched_getaffinity(0)),
                                                 initializer=register_cpu_intrinsics),
                 runner=ms.runner.LocalRunner(ms.runner.EvaluatorConfig(number=3, repeat=5, min_repeat_ms=50,
                                                                        enable_cpu_cache_flush=False)),
                 seed=int(sys.argv[5]))
# In trial order: get_all_tuning_records() sorts by time, the record file is in commit order.
workloads = [json.loads(line) for line in open(os.path.join(wd, "database_workload.json")) if line.strip()]
wl = [ms.database.Workload.from_json(w) for w in workloads]
rows = []
for line in open(os.path.join(wd, "database_tuning_record.json")):
    if not line.strip():
        continue
    idx, rec = json.loads(line)
    r = ms.database.TuningRecord.from_json(rec, wl[idx])
    secs = [float(x) for x in (r.run_secs or [])]
    ok = secs and all(0 < s < 1e9 for s in secs)
    rows.append({"trace": tvm.ir.save_json(r.trace.as_json()), "t": float(np.median(secs)) if ok else None,
                 "source": "tune_tir"})
json.dump(rows, open(out, "w"))
"""


def run_tune_tir(w, share, trials: int, seed: int, work: Path) -> list[dict]:
    """MetaSchedule's own tuner in a process confined to the share's cores (its builder and runner
    workers inherit that), with the same target spatialtune uses at this share."""
    target = target_for(detect_cpu(), share.units)
    out = work / "tune_tir.json"
    env = dict(os.environ, TVM_NUM_THREADS=str(share.units), OPENBLAS_NUM_THREADS=str(share.units))
    cores = share.cores
    p = subprocess.Popen([sys.executable, "-c", TUNE_TIR, json.dumps(w.to_dict()), json.dumps(target), str(trials),
                          str(out), str(seed)], env=env, preexec_fn=lambda: os.sched_setaffinity(0, cores),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=work, start_new_session=True)
    try:
        _, err = p.communicate()
    finally:  # a stopped benchmark must not leave MetaSchedule's tuner and its pools running
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if p.returncode != 0:
        raise RuntimeError(f"tune_tir failed: {err.strip().splitlines()[-1] if err.strip() else p.returncode}")
    return json.loads(out.read_text())


# ---------------------------------------------------------------- curves and the final pass


def best_after(rows: list[dict], n: int) -> dict | None:
    ok = [r for r in rows[:n] if r["t"] is not None]
    return min(ok, key=lambda r: r["t"]) if ok else None


def trials_to_95(rows: list[dict], final: float | None = None) -> int | None:
    ok = [r["t"] for r in rows if r["t"] is not None]
    if not ok:
        return None
    final = final or min(ok)
    best = float("inf")
    for i, r in enumerate(rows, 1):
        if r["t"] is not None:
            best = min(best, r["t"])
        if best <= final / 0.95:
            return i
    return None


def common_t95(have: dict[str, list[dict]]) -> dict[str, int | None]:
    """Trials to 95 % of the better final best of spatialtune with and without transfer."""
    pair = {m: have[m] for m in ("spatialtune", "spatialtune-scratch") if m in have}
    bests = [min((r["t"] for r in rows if r["t"] is not None), default=None) for rows in pair.values()]
    bests = [b for b in bests if b is not None]
    if len(pair) < 2 or not bests:
        return {}
    return {m: trials_to_95(rows, min(bests)) for m, rows in pair.items()}


def final_pass(w, share, traces: list[str], art: Path, runner: LocalRunner, rounds: int,
               numpy: bool) -> tuple[list[list[float | None]], list[float]]:
    """Each config built again and measured by spatialtune's runner under ``share`` in ``rounds``
    rounds, each round every config and then (``numpy``) numpy on the same cores: (per config
    its time in each round, numpy's time in each round). The host drifts by tens of percent over
    a minute; a ratio between two times of one round is what holds still."""
    import tvm

    from spatialtune.workloads.schedule import apply_trace

    target = target_for(detect_cpu(), share.units)
    mods = [tvm.ir.save_json(apply_trace(w, t).mod) for t in traces]
    with LocalBuilder(art) as b:
        built = b.build([BuildInput(m, f"re{i}") for i, m in enumerate(mods)], target)
    times: list[list[float | None]] = [[] for _ in traces]
    numpy_s: list[float] = []
    for _ in range(rounds):
        res = runner.run(share, "none", [RunInput(w.to_dict(), x.artifact) for x in built])
        for i, r in enumerate(res):
            times[i].append(r.median_s if r.status == "ok" else None)
        if numpy:
            r = runner.measure_baseline(share, "none", w.to_dict(), "numpy")
            numpy_s.append(r.median_s if r.status == "ok" else None)
    return times, numpy_s


def _median(xs) -> float | None:
    xs = [x for x in xs if x]
    return float(np.median(xs)) if xs else None


def vs_numpy(d: dict, pick: dict) -> float | None:
    """numpy's time over the pick's: the median of the final pass's per-round ratios (results of
    older passes: the ratio of the two times)."""
    rounds, ns = pick.get("rounds"), d.get("numpy_rounds")
    if rounds and ns and len(rounds) == len(ns):
        return _median([n / t for n, t in zip(ns, rounds) if n and t])
    return d["numpy_s"] / pick["t"] if d.get("numpy_s") and pick.get("t") else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="64,128,256")
    ap.add_argument("--workloads", default=",".join(FULL))
    ap.add_argument("--ratios", default="100,50")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--diversity", type=float, default=None,
                    help="spatialtune's novelty weight when it picks a batch (default: tune's; 0: the ablation)")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench-search"))
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--quick", action="store_true", help="one small workload at 50 %%, budgets 2 and 4 (a smoke test)")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the cleanup of child processes runs
    quick = a.quick or bool(os.environ.get("SPATIALTUNE_QUICK"))
    if quick:  # at 50 % every method runs, spatialtune also from scratch: one share covers the script
        a.budgets, a.workloads, a.ratios = "2,4", ",".join(QUICK), "50"
        if a.methods == DEFAULT_METHODS:  # and the ablation, so every method of the script runs
            a.methods += "," + ",".join(f"spatialtune-{abl}" for abl in ABLATIONS)
        a.out = a.out if a.out != str(ROOT / "out" / "bench-search") else tempfile.mkdtemp(prefix="bench-search-")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("tvm").setLevel(logging.WARNING)
    logging.getLogger("spatialtune").setLevel(logging.WARNING)
    budgets = sorted(int(b) for b in a.budgets.split(","))
    ratios = sorted((float(r) for r in a.ratios.split(",")), reverse=True)
    methods = a.methods.split(",")
    out = Path(a.out)
    if a.table_only:  # the figure in the docs: from the committed results, nothing measured
        print(table(out, budgets))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    part = CpuPartition()
    settings = QUICK_RUN if quick else RunSettings(repeat=5, min_repeat_ms=20, timeout=60)
    work = Path(tempfile.mkdtemp(prefix="bench-search-work-"))  # built kernels: hundreds of MB at full size
    atexit.register(shutil.rmtree, work, True)
    with LocalRunner(part, settings=settings) as runner:
        for name in a.workloads.split(","):
            w = find_workload(name)
            for ratio in ratios:
                share = part.grant(ratio)
                tag = f"{w.name}@{share.key_ratio:g}"
                runs = {"spatialtune": lambda: run_spatialtune(w, ratio, out / f"{w.name}.sqlite", budgets[-1], a.seed,
                                                               work / "art", a.diversity, quick)}
                for abl, opt in ABLATIONS.items():  # each in its own database
                    runs[f"spatialtune-{abl}"] = (lambda abl=abl, opt=opt: run_spatialtune(
                        w, ratio, out / f"{w.name}-{abl}.sqlite", budgets[-1], a.seed, work / "art", a.diversity, quick,
                        **opt))
                runs |= {"uniform": lambda: run_uniform(w, share, budgets[-1], a.seed, work / "art", runner),
                         "tune_tir": lambda: run_tune_tir(w, share, budgets[-1], a.seed, work)}
                if ratio < 100:
                    runs["spatialtune-scratch"] = lambda: run_spatialtune(
                        w, ratio, out / f"{w.name}-scratch-{ratio:g}.sqlite", budgets[-1], a.seed, work / "art",
                        a.diversity, quick)
                todo = methods + (["spatialtune-scratch"] if ratio < 100 and "spatialtune" in methods else [])
                for m in todo:
                    f = out / f"{tag}-{m}.json"
                    if f.exists() or a.table_only:
                        continue
                    log.info("%s: %s, %d trials", tag, m, budgets[-1])
                    t0 = time.perf_counter()
                    rows = runs[m]()
                    f.write_text(json.dumps({"rows": rows, "wall_s": time.perf_counter() - t0}))
                    log.info("%s: %s done in %.0f s", tag, m, time.perf_counter() - t0)
                final = out / f"{tag}-final.json"
                if final.exists() or a.table_only:
                    continue
                picks, have = [], {}
                for m in todo:
                    rows = json.loads((out / f"{tag}-{m}.json").read_text())["rows"]
                    have[m] = rows
                    for b in budgets:
                        best = best_after(rows, b)
                        if best is not None:
                            picks.append((m, b, best["trace"]))
                log.info("%s: re-measuring %d configs and numpy", tag, len(picks))
                times, ns = final_pass(w, share, [p[2] for p in picks], work / "art", runner,
                                       rounds=1 if quick else FINAL_ROUNDS, numpy=w.op in MATMUL_FAMILY)
                final.write_text(json.dumps({
                    "machine": machine(), "date": time.strftime("%Y-%m-%d"), "workload": w.name, "key": w.key, "op": w.op, "flops": w.flops, "ratio": share.key_ratio,
                    "units": share.units, "numpy_s": _median(ns), "numpy_rounds": ns,
                    "picks": [{"method": m, "budget": b, "t": _median(t), "rounds": t}
                              for (m, b, _), t in zip(picks, times)],
                    "t95": {m: trials_to_95(rows) for m, rows in have.items()},
                    # the same bar for both: 95 % of the better of the two final bests (a run that
                    # ends on a slower kernel reaches 95 % of *its own* final best sooner)
                    "t95_common": common_t95(have),
                    "wall_s": {m: json.loads((out / f"{tag}-{m}.json").read_text())["wall_s"] for m in have},
                    "trials": {m: len(rows) for m, rows in have.items()}}))
    print(table(out, budgets))
    return 0


def machine() -> str:
    return (f"{cpu_model()} ({len(os.sched_getaffinity(0))} cores), {platform.system()} "
            f"{platform.release().split('-')[0]}, LLVM CPU {detect_cpu().arch}")


def verdicts(finals: list[dict], budgets: list[int]) -> list[str]:
    """One line per question the benchmark exists to answer."""
    out = ["", "verdicts:"]
    for d in finals:
        by: dict[str, dict[int, float]] = {}
        last_pick = None
        for p in d["picks"]:
            if p["t"]:
                by.setdefault(p["method"], {})[p["budget"]] = p["t"]
                if p["method"] == "spatialtune" and p["budget"] == budgets[-1]:
                    last_pick = p
        st = by.get("spatialtune", {})
        for b in budgets:
            rivals = {m: by[m][b] for m in ("tune_tir", "uniform") if b in by.get(m, {})}
            if b in st and rivals:
                ahead = [m for m, t in rivals.items() if st[b] < t]
                behind = {m: st[b] / t for m, t in rivals.items() if st[b] >= t}
                line = f"  {d['workload']} {d['ratio']:g}% @{b}: spatialtune "
                if not behind:
                    line += "beats " + " and ".join(ahead)
                else:
                    line += (("beats " + " and ".join(ahead) + ", not ") if ahead else "does not beat ") + \
                        " and ".join(f"{m} (slower by {100 * (r - 1):.0f} %)" for m, r in behind.items())
                out.append(line)
        for m, what in (("spatialtune-nolocal", "with neighbours of the best kernels {}x the time without them"),
                        ("spatialtune-nopack", "with the packed-panel space {}x the time without it"),
                        ("spatialtune-notile", "with register-tile seeds {}x the time without them")):
            ablation = by.get(m, {})
            for b in budgets:
                if b in st and b in ablation:
                    out.append(f"  {d['workload']} {d['ratio']:g}% @{b}: " + what.format(f"{st[b] / ablation[b]:.2f}"))
        r = vs_numpy(d, last_pick) if last_pick is not None else None
        if r:
            out.append(f"  {d['workload']} {d['ratio']:g}%: spatialtune at {budgets[-1]} trials is "
                       f"{r:.2f}x numpy on the same cores")
        t95 = d.get("t95", {})
        if t95.get("spatialtune") and t95.get("spatialtune-scratch"):
            out.append(f"  {d['workload']} {d['ratio']:g}%: 95 % of the final best after {t95['spatialtune']} trials "
                       f"with transfer, {t95['spatialtune-scratch']} from scratch "
                       f"({t95['spatialtune'] / t95['spatialtune-scratch']:.2f} of them)")
        common = d.get("t95_common", {})
        if "spatialtune" in common:
            def n(m):
                return "not in %d" % d["trials"][m] if common.get(m) is None else str(common[m])
            out.append(f"  {d['workload']} {d['ratio']:g}%: 95 % of the better of the two final bests after "
                       f"{n('spatialtune')} trials with transfer, {n('spatialtune-scratch')} from scratch")
    return out


def table(out: Path, budgets: list[int]) -> str:
    """The table of the results under ``out``, with the machine and date they were measured on."""
    finals = [json.loads(f.read_text()) for f in sorted(out.glob("*-final.json"))]
    where = sorted({f"{d.get('machine', '?')}, {d.get('date', '?')}" for d in finals})
    lines = [f"measured on: {'; '.join(where) or machine()}"]
    hdr = (f"{'workload':<22} {'share':>6} {'method':<20} " + " ".join(f"{'best@' + str(b):>10}" for b in budgets)
           + f" {'GFLOP/s':>8} {'vs numpy':>8} {'t95':>5} {'wall s':>7}")
    lines += [hdr, "-" * len(hdr)]
    for d in finals:
        by, last_picks = {}, {}
        for p in d["picks"]:
            by.setdefault(p["method"], {})[p["budget"]] = p["t"]
            if p["budget"] == budgets[-1]:
                last_picks[p["method"]] = p
        for m, bs in by.items():
            last = bs.get(budgets[-1])
            cells = " ".join(f"{(bs[b] * 1e3 if bs.get(b) else float('nan')):>8.3f}ms" for b in budgets)
            gf = d["flops"] / last / 1e9 if last else float("nan")
            r = vs_numpy(d, last_picks[m]) if m in last_picks else None
            vs = f"{r:.2f}x" if r else "-"
            lines.append(f"{d['workload']:<22} {d['ratio']:>5g}% {m:<20} {cells} {gf:>8.1f} {vs:>8} "
                         f"{d['t95'].get(m) or '-':>5} {d['wall_s'].get(m, 0):>7.0f}")
        if d.get("numpy_s"):
            lines.append(f"{'':<22} {'':>6} {'numpy':<20} {d['numpy_s'] * 1e3:>8.3f}ms "
                         f"(same {d['units']} core{'s' if d['units'] > 1 else ''})")
    lines += verdicts(finals, budgets)
    lines.append("best@B: the best config after B trials by the method's own measurements, re-measured by spatialtune's "
                 "runner in one final pass (the median of its rounds); vs numpy > 1: faster than numpy (OpenBLAS) on the "
                 "same cores (the median of the rounds' ratios where numpy was timed in each round; older passes: numpy's "
                 "best time after the rounds); t95: trials "
                 "to 95 % of the method's final best; spatialtune-scratch: the share tuned in a fresh database, "
                 "without the whole-device share's configs and data")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
