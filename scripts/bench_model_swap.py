#!/usr/bin/env python3
"""Swapping a tenant's compiled model when a scheduler resizes its share: preloaded against on demand.

A scheduler that moves a tenant from one core count to another asks ``ModelLookup`` for the
variant of the new share and the tenant runs it. This times, in one process (the tenant's), from
the answer to the end of the first inference on the new variant:

- preloaded: every variant's library loaded and VM created up front (``ModelLookup(preload=True)``):
  the swap is the answer, resizing TVM's thread pool, and the inference;
- load on demand: the variant's library loaded (a fresh copy of the file each time, so the
  dynamic loader cannot hand back the handle it already has) and its VM created, then the inference;
- compile on demand: the model compiled from the tuning database for the new share (what a
  system without exported variants does), loaded, then the inference;

and the answer alone (memoised and uncached) and a steady-state inference for scale.

Without --model it builds the small conv + MLP model of docs/models.md, tunes it at 50 % and
100 % (--trials per share) and times it end to end (``spatialtune model``), all through the CLI
in a temporary directory; the export is always made with ``spatialtune model export``.

Usage: scripts/bench-model-swap [--model M.onnx --db DB [--shape x=...]] [--reps 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "spatialtune.cli", *args], check=True, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))


def tiny_model(path: Path) -> None:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)

    def w(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["c1"]), helper.make_node("Flatten", ["c1"], ["f"]),
             helper.make_node("MatMul", ["f", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["y0"]),
             helper.make_node("Add", ["y0", "b2"], ["y"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [w("cw", (8, 4, 3, 3)), w("cb", (8,)), w("w1", (512, 32)), w("b1", (32,)), w("w2", (32, 10)), w("b2", (10,))])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:9.3f} ms (min {min(xs) * 1e3:.3f}, n={len(xs)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="ONNX file (default: build and tune a small one)")
    ap.add_argument("--db", help="tuning database with the model's tasks tuned (with --model)")
    ap.add_argument("--shape", action="append", default=[])
    ap.add_argument("--ratios", default="50,100")
    ap.add_argument("--trials", type=int, default=16, help="per share, when the small model is tuned here")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--compile-reps", type=int, default=3)
    a = ap.parse_args()
    if os.environ.get("SPATIALTUNE_QUICK"):  # the tests' smoke run: every path once, few repeats
        a.trials, a.reps, a.compile_reps = min(a.trials, 4), min(a.reps, 3), 1
    tmp = Path(tempfile.mkdtemp(prefix="spatialtune-swap-"))
    try:
        if a.model:
            model, db = Path(a.model), Path(a.db or os.environ.get("SPATIALTUNE_DB", "tuning_db/spatialtune.sqlite"))
        else:
            model, db = tmp / "tiny.onnx", tmp / "db.sqlite"
            tiny_model(model)
            cli("workloads", "--from-onnx", str(model), "--out", str(tmp / "tiny.toml"))
            cli("tune", "--space", str(tmp / "tiny.toml"), "--ratios", a.ratios, "--trials", str(a.trials), "--db",
                str(db), "--batch", "4", "--population", "16", "--genetic-iters", "1", "--repeat", "2")
            cli("model", str(model), "--ratios", a.ratios, "--rounds", "2", "--db", str(db))
        shapes = [x for s in a.shape for x in ("--shape", s)]
        cli("model", "export", str(model), "--ratios", a.ratios, "--out", str(tmp / "out"), "--db", str(db), *shapes)
        return bench(model, db, tmp, a)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench(model: Path, db: Path, tmp: Path, a) -> int:
    import numpy as np

    from spatialtune.lookup import ModelLookup
    from spatialtune.lookup.models import LoadedVariant

    ml = ModelLookup(tmp / "out", preload=True)
    if len(ml.variants) < 2:
        print("the export has one variant (one core count): nothing to swap", file=sys.stderr)
        return 1
    small, big = ml.variants[0], ml.variants[-1]
    rng = np.random.default_rng(0)
    x = [rng.uniform(-1, 1, i["shape"]).astype(i["dtype"]) for i in ml.manifest["model"]["inputs"]]

    t = []
    for _ in range(100_000):
        t0 = time.perf_counter_ns()
        ml.lookup(units=big.granted_units)
        t.append(time.perf_counter_ns() - t0)
    cached = statistics.median(t) / 1e3
    t = []
    for u in range(1000, 11000):  # each a new request: the share rule runs
        t0 = time.perf_counter_ns()
        ml.lookup(units=u)
        t.append(time.perf_counter_ns() - t0)
    uncached = statistics.median(t) / 1e3

    steady, swap, load, comp = [], [], [], []
    lv = ml.load(ml.lookup(units=small.granted_units))
    lv.run(x)
    for _ in range(a.reps):
        t0 = time.perf_counter()
        lv.run(x)
        steady.append(time.perf_counter() - t0)
    for i in range(a.reps):  # small -> big -> small ...: every iteration is a swap
        v = big if i % 2 == 0 else small
        t0 = time.perf_counter()
        ml.load(ml.lookup(units=v.granted_units)).run(x)
        swap.append(time.perf_counter() - t0)
    for i in range(a.reps):
        v = big if i % 2 == 0 else small
        copy = tmp / f"copy-{i}.so"
        shutil.copy(tmp / "out" / v.file, copy)
        t0 = time.perf_counter()
        ans = ml.lookup(units=v.granted_units)
        LoadedVariant(ans.variant, str(copy), ml.cores).run(x)
        load.append(time.perf_counter() - t0)

    from spatialtune.device import detect_cpu, target_for
    from spatialtune.models.e2e import compile_model, records_for
    from spatialtune.models.importer import extract_workloads, load_onnx
    from spatialtune.store.database import TuningDatabase

    imported = load_onnx(model, {s.split("=")[0]: tuple(map(int, s.split("=")[1].split(","))) for s in a.shape})
    tasks = extract_workloads(imported)
    device = detect_cpu()
    with TuningDatabase(db, create=False) as tdb:
        for i in range(a.compile_reps):
            v = big if i % 2 == 0 else small
            out = tmp / f"compiled-{i}.so"
            t0 = time.perf_counter()
            ans = ml.lookup(units=v.granted_units)
            msdb, _ = records_for(tdb, tasks, device, "cpu", ans.variant.ratio)
            compile_model(imported, target_for(device, ans.variant.granted_units), msdb, str(out), tasks)
            LoadedVariant(ans.variant, str(out), ml.cores).run(x)
            comp.append(time.perf_counter() - t0)

    print(f"model {ml.model}: variants {', '.join(f'{v.ratio:g}% ({v.threads} threads)' for v in ml.variants)}; "
          f"device {ml.manifest['device']['name']}, {len(ml.cores)} cores")
    print(f"answer (ModelLookup.lookup)       memoised {cached:.2f} us, uncached {uncached:.2f} us (median)")
    print(f"inference, same variant           {ms(steady)}")
    print(f"swap, preloaded                   {ms(swap)}")
    print(f"swap, load on demand              {ms(load)}")
    print(f"swap, compile on demand           {ms(comp)}")
    print(f"preloaded swap vs load on demand: {statistics.median(load) / statistics.median(swap):.1f}x faster; "
          f"vs compile: {statistics.median(comp) / statistics.median(swap):.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
