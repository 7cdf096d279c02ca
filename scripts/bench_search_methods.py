"""The searches that scripts/bench_search.py compares, each returning its trials in measurement
order as rows ``{"trace", "t", "at_s", "source"}``: ``t`` is the kernel's *first* measurement
(the median of that run's repeats; None when it failed), ``at_s`` the seconds since the method
started when that measurement was recorded. A pick at a trial or wall-time budget reads only the
rows measured by then, so a later re-measurement cannot decide it.

Every method builds on every core of the machine and measures through spatialtune's runner:
worker processes that hold the share, one TVM thread bound to each of its cores, warm-up before
the timed repeats, the output checked against the float64 reference. MetaSchedule's ``tune_tir``
gets that runner wrapped as a MetaSchedule ``PyRunner``; ``tune_tir-stock`` is its own
``LocalRunner`` (no binding, no warm-up) in a process confined to the share, as a user would run it.
"""
from __future__ import annotations

import calendar
import json
import os
import signal
import logging
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from spatialtune.device import detect_cpu, target_for
from spatialtune.measure.builder import BuildInput, LocalBuilder
from spatialtune.measure.runner import LocalRunner, RunInput, RunSettings
from spatialtune.tuning.confirm import first_measurement_s

# spatialtune without one of its parts: method spatialtune-<name> sets these TuneOptions
ABLATIONS = {"nolocal": {"local": 0.0}, "nopack": {"pack_panels": False}, "notile": {"tile_seeds": 0}}
# measurements tune makes after a key's search (the winners matrix, imported configs): not trials
NOT_TRIALS = ("matrix", "import")

log = logging.getLogger("bench-search")


def _epoch(created_at: str) -> float:
    return float(calendar.timegm(time.strptime(created_at, "%Y-%m-%dT%H:%M:%SZ")))


def run_spatialtune(w, ratio: float, db_path: Path, trials: int, seed: int, art: Path, settings: RunSettings,
                    diversity: float | None = None, quick: bool = False, **ablation) -> dict:
    """tune() at one share into ``db_path`` (a database that may hold earlier shares: transfer)."""
    from spatialtune.store.database import TuningDatabase
    from spatialtune.tuning import TuneOptions, tune

    extra = ({} if diversity is None else {"diversity": diversity}) | ablation
    if quick:  # a smoke test of the script, not of the search: a small population
        extra |= {"population": 32, "genetic_iters": 1}
    t0 = time.time()
    with TuningDatabase(db_path) as db:
        s = tune([w], [ratio], db, TuneOptions(trials=trials, seed=seed, baselines=False, artifact_dir=str(art),
                                               run=settings, **extra))
        rows = rows_from_db(db, w.key, s.results[0].ratio, settings.repeat, t0)
    return {"rows": rows, "timings": dict(s.timings)}


def rows_from_db(db, workload_key: str, ratio: float, repeat: int, t0: float) -> list[dict]:
    """A key's trials in measurement order, each with its first measurement (the first ``repeat``
    times: a confirmation's repeats come after them) and when it was recorded after ``t0``."""
    ms = [m for m in db.measurements(workload_key=workload_key, ratio=ratio) if m.source not in NOT_TRIALS]
    # created_at has whole seconds: a row's time is at most a second late
    return [{"trace": m.trace, "t": first_measurement_s(m, repeat) if m.status == "ok" else None,
             "at_s": max(0.0, _epoch(m.created_at) - int(t0)), "source": m.source} for m in ms]


def run_uniform(w, share, trials: int, seed: int, art: Path, runner: LocalRunner) -> dict:
    """Uniform sampling through the ask/tell contract every search keeps (search.space.Search),
    16 candidates a batch."""
    from spatialtune.search.uniform import UniformSampler

    t0 = time.time()
    target = target_for(detect_cpu(), share.units)
    search = UniformSampler(w, target, seed=seed)
    out = []
    with LocalBuilder(art) as b:
        while len(out) < trials:
            chunk = search.ask(min(16, trials - len(out)))
            if not chunk:
                break
            built = b.build([BuildInput.of(c, w.key) for c in chunk], target)
            ok = [j for j, x in enumerate(built) if x.ok]
            res = dict(zip(ok, runner.run(share, "none", [RunInput(w.to_dict(), built[j].artifact) for j in ok])))
            times = [res[j].median_s if j in res and res[j].status == "ok" else None for j in range(len(chunk))]
            search.tell(chunk, times)
            at = time.time() - t0
            out += [{"trace": c.trace, "t": t, "at_s": at, "source": "uniform"} for c, t in zip(chunk, times)]
    search.close()
    return {"rows": out}


TUNE_TIR = r"""
import json, os, re, shutil, sys, time
import numpy as np
import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from spatialtune.workloads.spec import Workload


def register_cpu_intrinsics():
    # MetaSchedule's default_build imports all of tvm.s_tir.tensor_intrin (mostly the CUDA
    # families, slow) in every fresh worker of every build() call; registering only the CPU
    # families first makes that import a no-op. Its search and its builds are unchanged.
    from spatialtune.workloads.schedule import ensure_tensor_intrinsics

    ensure_tensor_intrinsics("llvm")


@derived_object
class Done(ms.runner.PyRunnerFuture):
    def __init__(self, res):
        super().__init__()
        self.res = res

    def done(self):
        return True

    def result(self):
        return self.res


@derived_object
class BoundRunner(ms.runner.PyRunner):
    # spatialtune's runner behind MetaSchedule's interface: the same workers, binding, warm-up and
    # output check as every other method's measurements
    def __init__(self, runner, share, workload):
        super().__init__()
        self.runner, self.share, self.workload = runner, share, workload

    def run(self, inputs):
        from spatialtune.measure.runner import RunInput

        res = self.runner.run(self.share, "none", [RunInput(self.workload, str(i.artifact_path)) for i in inputs])
        return [Done(ms.runner.RunnerResult([float(t) for t in r.times], None) if r.status == "ok" else
                     ms.runner.RunnerResult(None, f"{r.status}: {r.error}"[:500])) for r in res]


@derived_object
class Clock(ms.measure_callback.PyMeasureCallback):
    # when each batch's records were committed (the default callbacks run first)
    def __init__(self, t0, batches):
        super().__init__()
        self.t0, self.batches = t0, batches

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        self.batches.append((len(measure_candidates), time.time() - self.t0))


register_cpu_intrinsics()
a = json.loads(sys.argv[1])
t0 = time.time()
w = Workload.from_dict(a["workload"])
target = tvm.target.Target(a["target"])
wd = a["work_dir"]
shutil.rmtree(wd, ignore_errors=True)  # a run stopped midway left its records: this run starts where it says
os.makedirs(wd)
n_warm = 0
if a["warm_from"]:  # the earlier shares' database: the evolutionary search seeds from its top records
    for f in ("database_workload.json", "database_tuning_record.json"):
        shutil.copy(os.path.join(a["warm_from"], f), os.path.join(wd, f))
    n_warm = sum(1 for line in open(os.path.join(wd, "database_tuning_record.json")) if line.strip())
if a["runner"] == "bound":
    from spatialtune.measure.runner import LocalRunner, RunSettings
    from spatialtune.partitions.cpu import CpuPartition

    part = CpuPartition()
    st_runner = LocalRunner(part, settings=RunSettings(**a["run"]))
    runner = BoundRunner(st_runner, part.grant(a["ratio"]), a["workload"])
else:
    runner = ms.runner.LocalRunner(ms.runner.EvaluatorConfig(number=3, repeat=5, min_repeat_ms=50,
                                                             enable_cpu_cache_flush=False))
batches = []
db = ms.tune_tir(w.ir_module(), target, wd, max_trials_global=a["trials"], num_trials_per_iter=16,
                 # MetaSchedule's default build timeout (30 s), as users run it: at 300 s a few
                 # pathological batch-matmul builds held the search for 5 minutes each
                 builder=ms.builder.LocalBuilder(max_workers=len(os.sched_getaffinity(0)),
                                                 initializer=register_cpu_intrinsics),
                 runner=runner, seed=a["seed"],
                 measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), Clock(t0, batches)])
# In commit order (get_all_tuning_records() sorts by time); the warm start's records come first.
wl = [ms.database.Workload.from_json(json.loads(line))
      for line in open(os.path.join(wd, "database_workload.json")) if line.strip()]
records = [json.loads(line) for line in open(os.path.join(wd, "database_tuning_record.json")) if line.strip()]
ends = np.cumsum([n for n, _ in batches])
rows = []
for i, (idx, rec) in enumerate(records[n_warm:]):
    r = ms.database.TuningRecord.from_json(rec, wl[idx])
    secs = [float(x) for x in (r.run_secs or [])]
    ok = secs and all(0 < s < 1e9 for s in secs)
    b = min(int(np.searchsorted(ends, i, side="right")), len(batches) - 1)
    rows.append({"trace": tvm.ir.save_json(r.trace.as_json()), "t": float(np.median(secs)) if ok else None,
                 "at_s": batches[b][1] if batches else None, "source": "tune_tir"})
picked = []
for f in sorted(os.listdir(os.path.join(wd, "logs"))) if os.path.isdir(os.path.join(wd, "logs")) else []:
    picked += [int(n) for n in re.findall(r"Picked top (\d+) candidate", open(os.path.join(wd, "logs", f)).read())]
json.dump({"rows": rows, "warm_records": n_warm, "picked_from_db": picked,
           "warm_traces": [tvm.ir.save_json(ms.database.TuningRecord.from_json(rec, wl[idx]).trace.as_json())
                           for idx, rec in records[:n_warm]]}, open(a["out"], "w"))
if a["runner"] == "bound":
    st_runner.close()
"""


def run_tune_tir(w, share, trials: int, seed: int, work_dir: Path, settings: RunSettings, *,
                 warm_from: Path | None = None, stock: bool = False) -> dict:
    """MetaSchedule's tune_tir with the target spatialtune uses at this share, its database in
    ``work_dir`` (kept: the next share may start from it). ``warm_from``: an earlier run's
    ``work_dir`` whose records it starts with. Bound runner (above) unless ``stock``: then its own
    LocalRunner, the whole process confined to the share's cores."""
    target = target_for(detect_cpu(), share.units)
    out = work_dir / "rows.json"
    args = {"workload": w.to_dict(), "target": target, "trials": trials, "seed": seed, "work_dir": str(work_dir),
            "out": str(out), "warm_from": str(warm_from) if warm_from else None, "ratio": share.key_ratio,
            "runner": "stock" if stock else "bound", "run": asdict(settings)}
    env, pre = dict(os.environ), None
    if stock:
        env |= {"TVM_NUM_THREADS": str(share.units), "OPENBLAS_NUM_THREADS": str(share.units)}
        cores = share.cores

        def pre():
            os.sched_setaffinity(0, cores)
    p = subprocess.Popen([sys.executable, "-c", TUNE_TIR, json.dumps(args)], env=env, preexec_fn=pre,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=work_dir.parent,
                         start_new_session=True)
    try:
        _, err = p.communicate()
    finally:  # a stopped benchmark must not leave MetaSchedule's tuner and its pools running
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if p.returncode != 0:
        raise RuntimeError(f"tune_tir failed: {err.strip().splitlines()[-1] if err.strip() else p.returncode}")
    return json.loads(out.read_text())


# ---------------------------------------------------------------- ONNX Runtime as a vendor anchor

ORT_TYPES = {"fp32": 1, "fp16": 10}  # onnx.TensorProto.FLOAT, FLOAT16


def onnx_model(w, path: Path) -> Path | None:
    """A one-node ONNX model of a matmul-family workload (Gemm with transB for the dense; MatMul,
    after a Transpose of B for ``transpose_b``, which ORT's optimizer folds into its kernel), or
    None where ONNX has no such operator for the dtype."""
    from onnx import helper

    if w.dtype not in ORT_TYPES or w.op not in ("dense", "matmul", "batch_matmul"):
        return None
    op, p = w.operator, w.params
    import numpy as np

    xs = op.random_inputs(p, w.dtype, np.random.default_rng(0))
    ty = ORT_TYPES[w.dtype]
    ins = [helper.make_tensor_value_info(n, ty, list(x.shape)) for n, x in zip("AB", xs)]
    out = helper.make_tensor_value_info("C", ty, list(op.output_shape(p)))
    if w.op == "dense":
        nodes = [helper.make_node("Gemm", ["A", "B"], ["C"], transB=1)]
    elif w.op == "batch_matmul" and p.get("transpose_b"):
        nodes = [helper.make_node("Transpose", ["B"], ["Bt"], perm=[0, 2, 1]),
                 helper.make_node("MatMul", ["A", "Bt"], ["C"])]
    else:
        nodes = [helper.make_node("MatMul", ["A", "B"], ["C"])]
    model = helper.make_model(helper.make_graph(nodes, w.name or "anchor", ins, [out]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def measure_onnxruntime(runner: LocalRunner, share, w, model: Path, seed: int) -> float | None:
    """ONNX Runtime on ``share`` in the share's measuring worker (``models.in_worker.run_onnxruntime``:
    intra-op threads = the share's cores, started inside the share's core set), its output checked
    against the float64 reference; its median time, or None when it failed or was wrong."""
    import numpy as np

    from spatialtune.measure.vendor import QUIET_S
    from spatialtune.measure.worker import WorkerError
    from spatialtune.workloads.check import check_output

    op, p = w.operator, w.params
    xs = op.random_inputs(p, w.dtype, np.random.default_rng(seed))
    s = runner.settings
    with runner.hold(share, "none") as held:
        time.sleep(QUIET_S)  # TVM's pool threads in that worker go quiet first, as before numpy
        try:
            r = held.worker.call("spatialtune.models.in_worker:run_onnxruntime", str(model), dict(zip("AB", xs)),
                                 {"repeat": s.repeat, "min_repeat_ms": s.min_repeat_ms, "warmup_ms": s.warmup_ms},
                                 timeout=s.timeout * 4)
        except WorkerError as e:
            log.warning("%s: ONNX Runtime anchor failed: %s", w.key, e)
            return None
    _, wrong = check_output(r["outputs"][0], op.reference(p, xs), w.dtype)
    if wrong:
        log.warning("%s: ONNX Runtime anchor gave a wrong result: %s", w.key, wrong)
    return None if wrong else float(r["median_s"])
