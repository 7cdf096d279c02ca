#!/usr/bin/env python3
"""Lookup latency: spatialtune's Lookup against MetaSchedule's JSONDatabase.query_tuning_record.

Builds (through the public TuningDatabase API) a database of WORKLOADS dense workloads x RATIOS
shares = at least 10k best-config rows, each a real MetaSchedule trace (tiling sampled with
sample_perfect_tile, so traces have the size and shape of tuned ones), then reports

- warm lookup latency, p50/p99 over N lookups (N = 100k): repeated requests (a scheduler asking
  the shares it grants, answers memoised) and, separately, uncached requests (every ratio new, so
  each one runs the exact/below/100% rules);
- cold start: a fresh process opening the database and answering its first lookup (Python start
  and imports reported apart), over several processes;
- the same for MetaSchedule's JSONDatabase over `spatialtune db export-metaschedule` of one share.

Usage: scripts/bench-lookup (which runs this file in .venv) [--workloads 100] [--ratios 100] [--n 100000] [--ms-n 100000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pct(xs_ns: list[int], q: float) -> float:
    xs = sorted(xs_ns)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] / 1000.0  # µs


def make_traces(w, n: int, seed: int) -> list[str]:
    """n distinct tiled schedules of a dense workload, as stored traces."""
    import tvm
    from tvm.s_tir import Schedule

    out, seen = [], set()
    for s in range(seed, seed + 20 * n):
        sch = Schedule(w.ir_module(), seed=s)
        b = sch.get_sblock("Y")
        i, j, k = sch.get_loops(b)
        ti = sch.sample_perfect_tile(i, n=3)
        tj = sch.sample_perfect_tile(j, n=3)
        tk = sch.sample_perfect_tile(k, n=2)
        i0, i1, i2 = sch.split(i, ti)
        j0, j1, j2 = sch.split(j, tj)
        k0, k1 = sch.split(k, tk)
        sch.reorder(i0, j0, i1, j1, k0, k1, i2, j2)
        sch.parallel(sch.fuse(i0, j0))
        sch.annotate(b, "meta_schedule.tiling_structure", "SSRSRS")
        sch.vectorize(j2)
        t = tvm.ir.save_json(sch.trace.as_json())
        if t not in seen:
            seen.add(t)
            out.append(t)
        if len(out) == n:
            break
    return out


def build_db(path: Path, n_workloads: int, n_ratios: int) -> tuple[list, object]:
    from spatialtune.store.database import Measurement, TuningDatabase
    from spatialtune.device import detect_cpu
    from spatialtune.workloads.spec import Workload

    dev = detect_cpu()
    rng = random.Random(0)
    ratios = [round(100 * (i + 1) / n_ratios, 4) for i in range(n_ratios)]
    ws = [Workload.from_dict({"op": "dense", "dtype": "fp32", "name": f"bench_{i}",
                              "params": {"M": 16 * (1 + i % 8), "N": 64 * (1 + i // 8 % 4), "K": 64 * (1 + i // 32)}})
          for i in range(n_workloads)]
    with TuningDatabase(path) as db:
        db.add_device(dev)
        for w in ws:
            db.add_workload(w)
            traces = make_traces(w, 4, seed=len(w.key))
            for r in ratios:
                k = rng.randrange(len(traces))
                db.record(Measurement(workload_key=w.key, device_id=dev.id, partition="cpu", ratio=r,
                                      interference="none", mod_hash=f"{hash((w.key, k)) & (2**64 - 1):016x}",
                                      trace=traces[k], status="ok", times=[1e-4] * 3,
                                      median_s=1e-4 * (1 + rng.random()) * 100 / r,
                                      granted_units=max(1, round(r / 100 * dev.units)),
                                      granted_share=r / 100, source="bench"))
    return ws, dev


COLD_LOOKUP = r"""
import sys, time, json
t0 = time.perf_counter()
from spatialtune.lookup import Lookup
t1 = time.perf_counter()
lk = Lookup(sys.argv[1])
r = lk.lookup(sys.argv[2], ratio=float(sys.argv[3]))
t2 = time.perf_counter()
assert r.found, r
print(json.dumps({"import_s": t1 - t0, "cold_s": t2 - t1}))
"""

COLD_MS = r"""
import sys, time, json
t0 = time.perf_counter()
import tvm
from tvm.s_tir import meta_schedule as ms
from spatialtune.workloads.spec import Workload
t1 = time.perf_counter()
w = Workload.from_dict(json.loads(sys.argv[2]))
mod, target = w.ir_module(), tvm.target.Target({"kind": "llvm", "num-cores": 2})
t2 = time.perf_counter()
db = ms.database.JSONDatabase(path_workload=sys.argv[1] + "/database_workload.json",
                              path_tuning_record=sys.argv[1] + "/database_tuning_record.json", allow_missing=False)
rec = db.query_tuning_record(mod, target, w.key)
t3 = time.perf_counter()
assert rec is not None
print(json.dumps({"import_s": t1 - t0, "cold_s": t3 - t2}))
"""


def cold(script: str, args: list[str], n: int) -> tuple[list[float], list[float]]:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    colds, imports = [], []
    for _ in range(n):
        p = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, check=True)
        d = json.loads(p.stdout.strip().splitlines()[-1])
        colds.append(d["cold_s"] * 1e3)
        imports.append(d["import_s"] * 1e3)
    return colds, imports


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", type=int, default=100)
    ap.add_argument("--ratios", type=int, default=100)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--ms-n", type=int, default=100_000)
    ap.add_argument("--cold-runs", type=int, default=15)
    ap.add_argument("--keep", default=None, help="build the databases here and keep them")
    ap.add_argument("--quick", action="store_true", help="a smoke test on a small database")
    a = ap.parse_args()
    if a.quick or os.environ.get("SPATIALTUNE_QUICK"):
        a.workloads, a.ratios, a.n, a.ms_n, a.cold_runs = 4, 5, 2000, 200, 2

    from spatialtune.device import describe_machine

    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-lookup-"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / "bench.sqlite"
    if path.exists():
        for p in work.glob("bench.sqlite*"):
            p.unlink()
    print(f"machine: {describe_machine()}")
    t0 = time.perf_counter()
    ws, dev = build_db(path, a.workloads, a.ratios)
    from spatialtune.store.database import TuningDatabase

    with TuningDatabase(path, create=False) as db:
        n_best = len(db.best_index_rows())
    print(f"database: {n_best} best-config rows ({a.workloads} workloads x {a.ratios} shares), "
          f"{path.stat().st_size / 1e6:.1f} MB, built in {time.perf_counter() - t0:.1f} s")

    from spatialtune.lookup import Lookup

    rng = random.Random(1)
    grid = [round(100 * (i + 1) / a.ratios, 4) for i in range(a.ratios)]
    lk = Lookup(path, check_interval_s=1.0)
    keys = [w.key for w in ws]
    for k in keys:  # first touch loads each workload's rows; warm means after that
        lk.lookup(k, ratio=100)
    # repeated requests: granted shares drawn from the tuned grid and half-way points between
    reqs = [(rng.choice(keys), rng.choice(grid) - rng.choice((0.0, 0.5))) for _ in range(a.n)]
    reqs = [(k, r if r > 0 else 1.0) for k, r in reqs]
    for k, r in reqs:  # fill the memo: warm
        lk.lookup(k, ratio=r)

    def latencies(requests):
        clock, look, lat = time.perf_counter_ns, lk.lookup, []
        for k, r in requests:
            t = clock()
            look(k, ratio=r)
            lat.append(clock() - t)
        return lat

    lat = latencies(reqs)
    print(f"spatialtune Lookup, warm, repeated requests : p50 {pct(lat, 50):6.2f} µs  p99 {pct(lat, 99):6.2f} µs"
          f"  ({a.n} lookups)")
    lat = latencies([(rng.choice(keys), 0.01 + 99.98 * rng.random()) for _ in range(a.n)])
    print(f"spatialtune Lookup, warm, uncached requests : p50 {pct(lat, 50):6.2f} µs  p99 {pct(lat, 99):6.2f} µs"
          f"  ({a.n} lookups, each ratio new)")
    lk.close()
    c, imp = cold(COLD_LOOKUP, [str(path), keys[len(keys) // 2], "37.5"], a.cold_runs)
    print(f"spatialtune Lookup, cold (open + first lookup): p50 {statistics.median(c):6.2f} ms  "
          f"p90 {sorted(c)[int(0.9 * (len(c) - 1))]:6.2f} ms  max {max(c):6.2f} ms  first {c[0]:6.2f} ms"
          f"  ({a.cold_runs} processes; import spatialtune.lookup {statistics.median(imp):.0f} ms apart)")

    # MetaSchedule: export one share, then query it the way a tvm.compile pipeline does
    from spatialtune.lookup.metaschedule import export_metaschedule

    msdir = work / "ms"
    with TuningDatabase(path, create=False) as db:
        t0 = time.perf_counter()
        export_metaschedule(db, 50, msdir)
        print(f"exported the 50% configs ({len(keys)} records) for MetaSchedule in {time.perf_counter() - t0:.1f} s")
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from spatialtune.device import target_for

    target = tvm.target.Target(target_for(dev))
    msdb = ms.database.JSONDatabase(path_workload=str(msdir / "database_workload.json"),
                                    path_tuning_record=str(msdir / "database_tuning_record.json"), allow_missing=False)
    mods = {w.key: w.ir_module() for w in ws}
    for k in keys:
        assert msdb.query_tuning_record(mods[k], target, k) is not None
    q, clock, lat = msdb.query_tuning_record, time.perf_counter_ns, []
    for i in range(a.ms_n):
        k = keys[i % len(keys)] if i % 2 else rng.choice(keys)
        m = mods[k]
        t = clock()
        q(m, target, k)
        lat.append(clock() - t)
    print(f"MetaSchedule JSONDatabase.query_tuning_record, warm: p50 {pct(lat, 50):6.2f} µs  "
          f"p99 {pct(lat, 99):6.2f} µs  ({a.ms_n} queries)")
    c, imp = cold(COLD_MS, [str(msdir), json.dumps(ws[len(ws) // 2].to_dict())], max(3, a.cold_runs // 3))
    print(f"MetaSchedule JSONDatabase, cold (open + first query): p50 {statistics.median(c):6.2f} ms  "
          f"max {max(c):6.2f} ms  ({len(c)} processes; import tvm {statistics.median(imp):.0f} ms apart)")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
