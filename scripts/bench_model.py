"""End-to-end latency per share on this machine: a BERT-base encoder layer and a ResNet-style stage
(both built here with onnx.helper, random weights, nothing downloaded) have their tasks extracted,
tuned at every share with the gradient task scheduler (towards ONNX Runtime's time for each task,
profiled first: --no-floors turns that off), then compiled whole three ways (the
kernels tuned for the share, those tuned for 100 %, untuned) and timed under each share next to
ONNX Runtime on the same cores. Prints, per model and share, the four latencies, the trials spent
and the task that costs most. Tuning resumes from the database (--db), so a second run with more
--trials continues; the end-to-end runs are done again each time.

--layouts nchw,NCHW16c compiles each model both ways: convolutions in NCHW, and blocked by 16 output
channels (spatialtune.models.layout), as separate tasks tuned and timed the same way; the default
is the CLI's, auto (which also computes large 3x3 convolutions as Winograd: --layouts
auto,NCHW16c compares that with the direct kernels).

--onnx FILE (repeatable, with --shape NAME=D1,D2,... where an input's shape is not static) runs a
model of your own the same way, beside the two or, with --models "", instead of them: the same
tuning, compiles, interleaved timing and tables, nothing keyed to a model's name or shapes.

SPATIALTUNE_QUICK=1 (or --quick): toy-sized models at 100 % only, one trial per task, a smoke test.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from onnx import TensorProto, helper, numpy_helper, save  # noqa: E402

from spatialtune.device import describe_machine  # noqa: E402
from spatialtune.measure.runner import RunSettings  # noqa: E402
from spatialtune.models.e2e import ModelOptions, measure_model  # noqa: E402
from spatialtune.models.floors import profile_floors  # noqa: E402
from spatialtune.models.importer import space_from_onnx  # noqa: E402
from spatialtune.models.layout import parse_layout  # noqa: E402
from spatialtune.store.model_runs import FLOOR_KIND, ModelRun  # noqa: E402
from spatialtune.store.database import TuningDatabase  # noqa: E402
from spatialtune.terms import COLD  # noqa: E402
from spatialtune.tuning import TuneOptions, tune  # noqa: E402
from spatialtune.workloads.spec import load_space  # noqa: E402

log = logging.getLogger("bench-model")


# ---------------------------------------------------------------- the models


def _param(rng, name, shape, scale):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def bert_layer(path: Path, seq=128, hid=768, heads=12, ffn=3072) -> Path:
    """One BERT-base encoder layer, post-norm: Q/K/V projections, scaled dot-product attention over
    12 heads, output projection + residual + LayerNorm, GELU (erf) FFN + residual + LayerNorm."""
    rng = np.random.default_rng(0)
    d = hid // heads
    nodes, inits = [], [_const("shp4", np.array([1, seq, heads, d], np.int64)),
                        _const("shp3", np.array([1, seq, hid], np.int64)),
                        _const("scale", np.array(1 / np.sqrt(d), np.float32)),
                        _const("half", np.array(0.5, np.float32)), _const("one", np.array(1.0, np.float32)),
                        _const("isq2", np.array(1 / np.sqrt(2), np.float32))]

    def linear(x, n_in, n_out, name):
        inits.extend([_param(rng, name + "_w", (n_in, n_out), 1 / np.sqrt(n_in)), _param(rng, name + "_b", (n_out,), 0.02)])
        nodes.extend([helper.make_node("MatMul", [x, name + "_w"], [name + "_mm"]),
                      helper.make_node("Add", [name + "_mm", name + "_b"], [name])])
        return name

    def layer_norm(x, name):
        inits.extend([_const(name + "_g", np.ones(hid, np.float32)), _const(name + "_be", np.zeros(hid, np.float32))])
        nodes.append(helper.make_node("LayerNormalization", [x, name + "_g", name + "_be"], [name], axis=-1,
                                      epsilon=1e-12))
        return name

    for n in ("q", "k", "v"):
        linear("x", hid, hid, n)
        nodes += [helper.make_node("Reshape", [n, "shp4"], [n + "_r"]),
                  helper.make_node("Transpose", [n + "_r"], [n + "_t"], perm=[0, 2, 3, 1] if n == "k" else [0, 2, 1, 3])]
    nodes += [helper.make_node("MatMul", ["q_t", "k_t"], ["s0"]), helper.make_node("Mul", ["s0", "scale"], ["s1"]),
              helper.make_node("Softmax", ["s1"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v_t"], ["c0"]),
              helper.make_node("Transpose", ["c0"], ["c1"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["c1", "shp3"], ["c2"])]
    linear("c2", hid, hid, "o")
    nodes.append(helper.make_node("Add", ["o", "x"], ["r1"]))
    layer_norm("r1", "ln1")
    linear("ln1", hid, ffn, "f1")
    nodes += [helper.make_node("Mul", ["f1", "isq2"], ["g0"]), helper.make_node("Erf", ["g0"], ["g1"]),
              helper.make_node("Add", ["g1", "one"], ["g2"]), helper.make_node("Mul", ["f1", "g2"], ["g3"]),
              helper.make_node("Mul", ["g3", "half"], ["g4"])]
    linear("g4", ffn, hid, "f2")
    nodes.append(helper.make_node("Add", ["f2", "ln1"], ["r2"]))
    layer_norm("r2", "y")
    g = helper.make_graph(nodes, "bert_layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, hid])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, hid])], inits)
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def resnet_stage(path: Path, c=64, hw=56, blocks=3) -> Path:
    """ResNet-50's first stage: bottleneck blocks (1x1, 3x3, 1x1 convolutions with folded batch
    norm as bias, ReLU), a 1x1 projection shortcut in the first block, residual add + ReLU."""
    rng = np.random.default_rng(1)
    nodes, inits = [], []

    def conv(x, cin, cout, k, name, relu):
        inits.extend([_param(rng, name + "_w", (cout, cin, k, k), np.sqrt(2 / (cin * k * k))),
                      _param(rng, name + "_b", (cout,), 0.1)])
        nodes.append(helper.make_node("Conv", [x, name + "_w", name + "_b"], [name + "_c"], kernel_shape=[k, k],
                                      pads=[k // 2] * 4))
        if not relu:
            return name + "_c"
        nodes.append(helper.make_node("Relu", [name + "_c"], [name]))
        return name

    x, cin = "x", c
    for b in range(blocks):
        a = conv(x, cin, c, 1, f"b{b}a", True)
        m = conv(a, c, c, 3, f"b{b}b", True)
        e = conv(m, c, 4 * c, 1, f"b{b}c", False)
        short = conv(x, cin, 4 * c, 1, f"b{b}s", False) if cin != 4 * c else x
        nodes += [helper.make_node("Add", [e, short], [f"b{b}sum"]), helper.make_node("Relu", [f"b{b}sum"], [f"b{b}"])]
        x, cin = f"b{b}", 4 * c
    g = helper.make_graph(nodes, "resnet_stage", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4 * c, hw, hw])], inits)
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


MODELS = {"bert_layer": (bert_layer, {}, dict(seq=16, hid=64, heads=2, ffn=128)),
          "resnet_stage": (resnet_stage, {}, dict(c=8, hw=8, blocks=1))}


# ---------------------------------------------------------------- the run


def fmt(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def pick_models(a) -> tuple[dict, dict]:
    """{name: a function of the output folder giving the model's ONNX file} for the built-in models
    asked for and the --onnx files, and the --shape dict; SystemExit(2) with one line for a bad one."""
    from spatialtune.errors import SpatialtuneError
    from spatialtune.models.importer import parse_shapes

    models: dict = {}
    for m in (x.strip() for x in a.models.split(",") if x.strip()):
        if m not in MODELS:
            _die(f"--models {m!r}: not a built-in model ({', '.join(MODELS)}); give a file with --onnx")
        build, full, toy = MODELS[m]
        models[m] = lambda out, build=build, kw=(toy if a.quick else full), m=m: build(out / f"{m}.onnx", **kw)
    for f in a.onnx:
        if not Path(f).is_file():
            _die(f"--onnx {f}: no such file")
        models[Path(f).stem] = lambda out, f=f: Path(f)
    if not models:
        _die("no models: give --models or --onnx")
    try:
        return models, parse_shapes(a.shape)
    except SpatialtuneError as e:
        _die(str(e))


def _die(msg: str):
    print(f"bench-model: {msg}", file=sys.stderr)
    raise SystemExit(2)


def write_onnx(out: Path, names: list[str], quick: bool) -> int:
    """The models' ONNX files into ``out`` (toy-sized when ``quick``), one path per line."""
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        print(f"bench-model: --models {unknown[0]}: no such model (known: {', '.join(MODELS)})", file=sys.stderr)
        return 2
    for m in names:
        build, full, toy = MODELS[m]
        print(build(out / f"{m}.onnx", **(toy if quick else full)))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", default=bool(os.environ.get("SPATIALTUNE_QUICK")))
    ap.add_argument("--trials", type=int, default=None, help="trials per share per model (default 256; quick: one "
                                                             "per task)")
    ap.add_argument("--ratios", default=None, help="shares, percent, tuned in this order (default 100,50)")
    ap.add_argument("--models", default=",".join(MODELS), help="built-in models (%(default)s); \"\" for none")
    ap.add_argument("--onnx", action="append", default=[], metavar="FILE",
                    help="also run this ONNX model (repeatable); its name is the file's stem")
    ap.add_argument("--shape", action="append", default=[], metavar="NAME=D1,D2,...",
                    help="static shape of an input of an --onnx model (as workloads --from-onnx takes it)")
    ap.add_argument("--layouts", default=None,
                    help="convolution layouts to compile each model in, e.g. nchw,NCHW16c (models.layout; default "
                         "auto, as the CLI; quick: nchw,NCHW8c; a layout that resolves to one already measured, "
                         "e.g. for a model without convolutions, is measured once)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(tempfile.gettempdir()) / "spatialtune-bench-model"))
    ap.add_argument("--db", default=None, help="tuning database (default: OUT/bench.sqlite)")
    ap.add_argument("--no-scratch", dest="scratch", action="store_false",
                    help="do not tune each share after the first again from an empty database (the trials to "
                         "95 %% of the model's kernel time without transfer)")
    ap.add_argument("--no-floors", dest="floors", action="store_false",
                    help="do not profile ONNX Runtime per share before tuning (the tasks' floors: a task as fast as "
                         "ORT's nodes for it leaves its trials to the tasks behind theirs)")
    ap.add_argument("--rerank-cold", type=int, default=0, metavar="K",
                    help="share-tuned: each task's fastest of its K fastest kernels out of cache (model --rerank-cold)")
    ap.add_argument("--interference", default="none",
                    help="the condition the tasks are tuned under and the models compiled from: none (default: "
                         "kernels timed back to back) or cold (each run with the caches emptied but for the task's "
                         "activations)")
    ap.add_argument("--table-only", action="store_true",
                    help="print the tables from the results saved under --out (MODEL-result.json); measure nothing")
    ap.add_argument("--write-onnx", metavar="DIR", default=None,
                    help="only write the models' ONNX files (toy-sized with --quick) into DIR and exit: what "
                         "scripts/gpu-bundle compiles per GPU share")
    a = ap.parse_args()
    if a.write_onnx:
        return write_onnx(Path(a.write_onnx), [m for m in a.models.split(",") if m.strip()], a.quick)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(a.out)
    layouts = [x.strip() for x in (a.layouts or ("nchw,NCHW8c" if a.quick else "auto")).split(",") if x.strip()]
    for x in layouts:
        parse_layout(x)  # a bad name is one line before anything runs
    if a.interference not in ("none", COLD):
        _die(f"--interference {a.interference!r}: none or {COLD} (a model runs with no neighbour here)")
    if a.table_only:  # every layout saved for these models
        names = [m for m in a.models.split(",") if m.strip()] + [Path(f).stem for f in a.onnx]
        return print_saved(out, [f.name[: -len("-result.json")] for m in names
                                 for f in sorted(out.glob(f"{m}*-result.json"))
                                 if f.name == f"{m}-result.json" or f.name.startswith(f"{m}-NCHW")])
    out.mkdir(parents=True, exist_ok=True)
    models, shapes = pick_models(a)
    db_path = Path(a.db or (os.environ.get("SPATIALTUNE_DB") if a.quick else None) or out / "bench.sqlite")
    ratios = [float(r) for r in (a.ratios or "100,50").split(",")]
    import onnxruntime

    where = f"{describe_machine()}, ONNX Runtime {onnxruntime.__version__}"
    print(f"machine: {where}; {'quick' if a.quick else 'full'} mode; database {db_path}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results, done = [], set()
    for name, layout in ((m, x) for m in models for x in layouts):
        onnx_path = models[name](out)
        text, tasks = space_from_onnx([onnx_path], shapes, layout=layout)
        if tasks[0].model in done:  # the layout resolved to one measured already (auto, or no convolution)
            print(f"\n{name}: --layout {layout} is {tasks[0].model}, measured above")
            continue
        name = tasks[0].model
        done.add(name)
        (out / f"{name}.toml").write_text(text)
        tasks = load_space(out / f"{name}.toml").workloads
        trials = a.trials or (len(tasks) if a.quick else 256)
        opts = TuneOptions(trials=trials, scheduler="gradient", baselines=not a.quick, interference=a.interference,
                           **(dict(batch=1, population=16, genetic_iters=1,
                                   run=RunSettings(repeat=2, min_repeat_ms=5, warmup_ms=5)) if a.quick else {}))
        shares, new = {}, 0
        mopts = dataclasses.replace(ModelOptions(rounds=2, min_repeat_ms=5, warmup_ms=5) if a.quick else ModelOptions(),
                                    layout=layout, rerank_cold=a.rerank_cold, interference=a.interference)
        with TuningDatabase(db_path) as db:
            if a.floors:  # ONNX Runtime's time per task at each share, what the scheduler tunes towards
                profile_floors(onnx_path, ratios, db, shapes=shapes, options=mopts, progress=print)
            for i, r in enumerate(ratios):  # one share at a time, each with what the earlier ones found
                t0 = time.perf_counter()
                new += sum(x.new_trials for x in tune(tasks, [r], db, opts).results)
                shares[f"{r:g}"] = {"tune_s": time.perf_counter() - t0, **reach(db, tasks, r, a.interference)}
                if i and a.scratch:  # the same share tuned again, knowing nothing of the others
                    with TuningDatabase(out / f"{name}-scratch-{r:g}.sqlite") as fresh:
                        for row in db.baselines(ratio=r, kind=FLOOR_KIND) if a.floors else ():
                            fresh.add_baseline_row(row)  # the floors profiled above, not measured again
                        t0 = time.perf_counter()
                        tune(tasks, [r], fresh, opts)
                        shares[f"{r:g}"]["scratch"] = {"tune_s": time.perf_counter() - t0,
                                                       **reach(fresh, tasks, r, a.interference,
                                                                     shares[f"{r:g}"]["final_s"])}
            res = measure_model(onnx_path, ratios, db, shapes=shapes, options=mopts)
        tune_s = sum(v["tune_s"] for v in shares.values())
        head = f"{name}: {len(tasks)} tasks, {trials} trials per share, tuned under {a.interference}"
        print(f"\n{head} ({new} measured now, tuning {tune_s:.0f} s)")
        results.append((name, res))
        print(table(res))
        print(convergence(shares))
        (out / f"{name}-result.json").write_text(json.dumps({
            "machine": where, "date": time.strftime("%Y-%m-%d"), "head": head, "tune_s": tune_s, "shares": shares,
            "load": os.getloadavg()[0], "rows": [r.to_dict() for r in res.rows]}, indent=1))
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (this machine's cores are "
          "shared: another job's threads slow a 2-core share down most)")
    verdicts(results)
    return 0 if all(row.status == "ok" for _, res in results for row in res.rows) else 1


class Saved:
    """A model's results read back from MODEL-result.json: what ``table`` needs of a ModelResult."""

    def __init__(self, rows: list[ModelRun]):
        self.rows = rows

    def row(self, ratio: float, variant: str) -> ModelRun | None:
        return next((r for r in self.rows if r.ratio == ratio and r.variant == variant), None)

    @property
    def ratios(self) -> list[float]:
        return sorted({r.ratio for r in self.rows}, reverse=True)


def print_saved(out: Path, names: list[str]) -> int:
    results, where = [], set()
    for name in names:
        f = out / f"{name}-result.json"
        if not f.exists():
            continue
        d = json.loads(f.read_text())
        where.add(f"{d['machine']}, {d['date']}")
        res = Saved([ModelRun(**r) for r in d["rows"]])
        results.append((name, res))
        print(f"{d['head']} (tuning in that run {d['tune_s']:.0f} s, load average {d['load']:.2f})")
        print(table(res))
        if d.get("shares"):
            print(convergence(d["shares"]))
    if not results:
        print(f"no results under {out}", file=sys.stderr)
        return 1
    print(f"measured on: {'; '.join(sorted(where))}")
    verdicts(results)
    return 0


def reach(db, tasks, ratio: float, interference: str = "none", ref_s: float | None = None) -> dict:
    """How the share's tuning converged, from its measurements in order: the model's kernel time
    (sum of weight x each task's best so far, once every task has one), ``final_s`` at the end, and
    ``trials_to_95``: the trials (failed ones count) after which it was within 95 % of ``ref_s``
    (default its own final), None if never."""
    rows = sorted((m for w in tasks for m in db.measurements(workload_key=w.key, ratio=ratio, interference=interference)),
                  key=lambda m: m.id)
    weight = {w.key: w.weight for w in tasks}
    best: dict[str, float] = {}
    curve = []
    for m in rows:
        if m.status == "ok" and m.median_s and m.median_s < best.get(m.workload_key, float("inf")):
            best[m.workload_key] = m.median_s
        curve.append(sum(weight[k] * t for k, t in best.items()) if len(best) == len(tasks) else None)
    final = curve[-1] if curve else None
    goal = (ref_s or final or 0) / 0.95
    hit = next((i + 1 for i, c in enumerate(curve) if c is not None and c <= goal), None)
    return {"trials": len(rows), "final_s": final, "trials_to_95": hit}


def convergence(shares: dict) -> str:
    lines = []
    for r, v in shares.items():
        line = (f"  {r}%: tuning {v['tune_s']:.0f} s; kernel time {fmt(v['final_s'])}, within 95 % of it after "
                f"{v['trials_to_95']} of {v['trials']} trials" + (" (with the earlier shares' transfers)" if
                                                                  "scratch" in v else ""))
        sc = v.get("scratch")
        if sc:
            got = "not reached" if sc["trials_to_95"] is None else f"after {sc['trials_to_95']}"
            line += (f"; from scratch {got} (its final {fmt(sc['final_s'])}, {sc['tune_s']:.0f} s)")
        lines.append(line)
    return "\n".join(lines)


def verdicts(results) -> None:
    orts = [res.row(r, "onnxruntime") for _, res in results for r in res.ratios]
    how = ("ORT as users run it, threads spinning, in a process of its own, interleaved with the variants"
           if all(o and o.detail.get("spinning") for o in orts) else
           "the faster of its run interleaved with the variants and its default, threads spinning, timed alone")
    print(f"\nend-to-end latency vs ONNX Runtime (share-tuned / ORT, {how}; < 1 is faster):")
    for name, res in results:
        for r in res.ratios:
            st, ort = res.row(r, "share-tuned"), res.row(r, "onnxruntime")
            if st and ort and st.latency_s and ort.vendor_s:
                x = st.latency_s / ort.vendor_s
                verdict = "matches or beats it" if x <= 1.0 else f"{x - 1:.0%} slower"
                top = costliest(st)
                print(f"  {name} @ {r:g}%: {x:.2f}x, {verdict}" + (f"; costliest task {top}" if x > 1.0 and top else ""))


def table(res) -> str:
    lines = [f"  {'share':>6} {'cores':>5} {'share-tuned':>12} {'100%-tuned':>12} {'untuned':>12} "
             f"{'ONNX Runtime':>12} {'vs ORT':>7} {'trials':>7}  costliest task (weight x time, part)"]
    for r in res.ratios:
        row = {v: res.row(r, v) for v in ("share-tuned", "whole-tuned", "untuned", "onnxruntime")}
        st, ort = row["share-tuned"], row["onnxruntime"]
        vs = f"{st.latency_s / ort.vendor_s:.2f}x" if st.latency_s and ort.vendor_s else "-"
        worst = costliest(st) or "-"
        bad = [f"{v} {x.status}: {x.error[:100]}" for v, x in row.items() if x and x.status != "ok"]
        lines.append(f"  {r:>5g}% {st.granted_units:>5} {fmt(st.latency_s):>12} {fmt(row['whole-tuned'].latency_s):>12} "
                     f"{fmt(row['untuned'].latency_s):>12} {fmt(ort.vendor_s):>12} {vs:>7} {st.trials or 0:>7}  {worst}"
                     + ("".join(f"\n      {b}" for b in bad)))
    return "\n".join(lines)


def costliest(st) -> str | None:
    top = st.costliest_task()
    return None if top is None else f"{top['name']} ({top['weight']} x {fmt(top['time_s'])}, {top['part']:.0%})"


if __name__ == "__main__":
    sys.exit(main())
