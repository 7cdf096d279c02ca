"""Throughput of the tuning pipeline on this machine: builds/s, measurements/s, and where a
trial's time goes (search vs build vs run). Ratios of one run; no numbers are asserted anywhere."""
import argparse
import logging
import os
import tempfile
import time

from spatialtune.store.database import TuningDatabase
from spatialtune.device import describe_machine
from spatialtune.measure.runner import RunSettings
from spatialtune.workloads.spec import load_space
from spatialtune.tuning import TuneOptions, tune

ap = argparse.ArgumentParser()
ap.add_argument("--trials", type=int, default=32)
ap.add_argument("--workload", action="append", default=None)
ap.add_argument("--ratios", default="100,50")
ap.add_argument("--quick", action="store_true", help="a smoke test: 4 trials of one workload at 100%%")
a = ap.parse_args()
if a.quick or os.environ.get("SPATIALTUNE_QUICK"):
    a.trials, a.workload, a.ratios = 4, ["dense_small"], "100"
logging.basicConfig(level=logging.WARNING)
logging.getLogger("tvm").setLevel(logging.WARNING)

space = load_space(os.path.join(os.path.dirname(__file__), "..", "search_spaces", "demo.toml"))
wls = space.select(a.workload or ["dense_small", "conv_small"])
ratios = [float(r) for r in a.ratios.split(",")]
with tempfile.TemporaryDirectory() as d, TuningDatabase(os.path.join(d, "bench.sqlite")) as db:
    t0 = time.perf_counter()
    s = tune(wls, ratios, db, TuneOptions(trials=a.trials, batch=8, baselines=False, artifact_dir=d,
                                          run=RunSettings()))
    wall = time.perf_counter() - t0
t = s.timings
n_built, n_meas = t["built"], t["measured"]
trials = sum(r.new_trials for r in s.results)
print(f"machine: {describe_machine()}")
print(f"job: {len(wls)} workloads x {len(ratios)} shares x {a.trials} trials = {trials} trials in {wall:.1f} s "
      f"(one-off setup incl. TVM tensor-intrinsic import: {t['setup']:.1f} s)")
print(f"candidates built per second:    {n_built / t['build']:.2f}  ({t['build']:.1f} s for {n_built}, "
      f"{os.cpu_count()} build workers)")
print(f"candidates measured per second: {n_meas / t['run']:.2f}  ({t['run']:.1f} s for {n_meas}; "
      f"check + {RunSettings().repeat} timed repeats of >= {RunSettings().min_repeat_ms} ms)")
per = {k: t[k] / max(1, trials) for k in ("search", "build", "run", "train")}
tot = sum(per.values())
print("time per trial: " + ", ".join(f"{k} {v * 1e3:.0f} ms ({v / tot:.0%})" for k, v in per.items()))
