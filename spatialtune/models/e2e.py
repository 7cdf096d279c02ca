"""A whole model under a share: compiled with per-share kernels, timed next to ONNX Runtime.

For each share, the model is compiled three ways and each is run under the share:

- **share-tuned**: every task's best config measured at this share (its tuning key's ratio);
- **whole-tuned**: every task's best config at 100 %, what an ordinary tuner hands out;
- **untuned**: TVM's default compilation (no schedule at all on a CPU);

and ONNX Runtime runs the same file on the same cores (intra-op threads = the share's cores, its
threads confined to them). Every variant's outputs are checked against ONNX Runtime's, on the same
random inputs. A task with no config for a variant runs untuned in it (``tuned_tasks`` says how
many had one). Each variant's latency is a row of ``model_runs`` (:mod:`spatialtune.store.model_runs`).

Compilation is ``compile_relax``'s pipeline spelled out: legalize and fuse (:func:`.importer.fuse`,
the passes the tasks were extracted with, so the database's workloads match structurally),
``MetaScheduleApplyDatabase`` with a MetaSchedule database holding the chosen configs, then only
Relax's lowering and finalization (running the whole default pipeline again would fuse the tuned
functions into new ones). The functions the database scheduled are counted, not assumed.

Runs happen in a measuring worker (:class:`spatialtune.measure.worker.Worker`) that holds the
share through the partition (CPU core sets here; a GPU share would need the model built into a
bundle, which this module does not do).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..device import DeviceInfo, detect_cpu, target_for
from ..errors import ConfigError
from ..measure.worker import Worker, WorkerError
from ..partitions import create_partition
from ..store.database import TuningDatabase
from ..store.model_runs import ModelRun, record_model_run
from ..terms import check_ratio, norm_ratio
from ..workloads.check import check_output
from ..workloads.schedule import apply_trace
from ..workloads.spec import Workload
from .importer import ImportedModel, extract_workloads, fuse, load_onnx

log = logging.getLogger(__name__)

CHECK_DTYPES = {"float32": "fp32", "float16": "fp16", "float64": "fp64"}


@dataclass
class ModelOptions:
    repeat: int = 5  # timed repeats; the median counts
    min_repeat_ms: int = 50  # each repeat runs the model enough times to last this long (at least once)
    warmup_ms: int = 100
    timeout: float = 900.0  # per variant and share: load, run, time
    seed: int = 0  # the random inputs
    mcpu: str | None = None  # the device whose tuning records are used (default: this machine's CPU)
    interference: str = "none"  # whose records: the condition they were tuned under
    fast_math: bool = True  # tasks build with vectorisable erf/exp/tanh where that passes the check

    def settings(self) -> dict:
        return {"repeat": self.repeat, "min_repeat_ms": self.min_repeat_ms, "warmup_ms": self.warmup_ms}


@dataclass
class ModelResult:
    model: ImportedModel
    device: DeviceInfo
    partition: str
    run: str
    tasks: list[Workload]
    rows: list[ModelRun] = field(default_factory=list)

    def row(self, ratio: float, variant: str) -> ModelRun | None:
        return next((r for r in self.rows if r.ratio == norm_ratio(ratio) and r.variant == variant), None)

    @property
    def ratios(self) -> list[float]:
        return sorted({r.ratio for r in self.rows}, reverse=True)


def random_feeds(model: ImportedModel, seed: int) -> dict[str, np.ndarray]:
    """Floats uniform in [-1, 1], integer inputs zero (token ids, indices: always in range)."""
    rng = np.random.default_rng(seed)
    return {n: rng.uniform(-1, 1, size=s).astype(dt) if np.dtype(dt).kind == "f" else np.zeros(s, dtype=dt)
            for n, s, dt in model.inputs}


def records_for(db: TuningDatabase, tasks: Sequence[Workload], device: DeviceInfo, partition: str, ratio: float,
                interference: str = "none"):
    """A MetaSchedule MemoryDatabase with each task's best config under (device, partition, ratio,
    interference), and the per-task facts: {key: {name, weight, time_s, mod_hash, trials}}."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    msdb = ms.database.MemoryDatabase()
    target = tvm.target.Target(target_for(device))
    facts = {}
    for w in tasks:
        key = dict(workload_key=w.key, device_id=device.id, partition=partition, ratio=ratio, interference=interference)
        best = db.best(**key)
        facts[w.key] = {"name": w.name, "weight": w.weight, "time_s": None, "mod_hash": None,
                        "trials": db.count_measurements(**key)}
        if not best:
            continue
        try:
            sch = apply_trace(w, best[0].trace)
        except Exception as e:  # a record of another TVM: the task runs untuned, and says so
            log.warning("%s: best config at %g%% does not replay (%s); untuned in this variant", w.key, ratio, e)
            continue
        mod = w.ir_module()
        msdb.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, msdb.commit_workload(mod), run_secs=[float(best[0].median_s)], target=target,
            args_info=ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
        facts[w.key] |= {"time_s": best[0].median_s, "mod_hash": best[0].mod_hash}
    return msdb, facts


def compile_model(model: ImportedModel, target: dict, msdb=None, out: str | None = None,
                  tasks: Sequence[Workload] = ()) -> tuple[object, int]:
    """(the Relax executable, how many functions the database scheduled); exported to ``out``.

    On a CPU target the functions that are ``tasks`` using fast math (:attr:`Workload.fast_math`)
    are built with it, as their tuned candidates were (:mod:`spatialtune.workloads.fastmath`);
    the rest, and every function when ``tasks`` is empty (TVM's own build), keep exact math."""
    import tvm
    from tvm import relax
    from tvm.relax import pipeline

    from ..workloads.fastmath import rewrite

    tgt = tvm.target.Target(target)
    mod = fuse(model.relax_mod, target)
    fast = _fast_functions(mod, tasks) if target.get("kind") == "llvm" else set()
    applied = 0
    if msdb is not None:
        with tgt, msdb, tvm.transform.PassContext(opt_level=3):
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        applied = sum(1 for f in mod.functions.values()
                      if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "tirx.is_scheduled" in f.attrs)
    if fast:  # after the database: the records match the exact functions the tasks were extracted as
        mod = rewrite(mod, skip=lambda name, _: name not in fast)[0]
    try:
        passes = [*pipeline.dataflow_lower_passes(tgt), *pipeline.finalize_passes(tgt)]
    except (AttributeError, ValueError):  # the 0.27 wheel's CPU backend does not export them: the same list
        from tvm.relax.backend.cpu_generic import pipeline as cpu

        passes = [*cpu.dataflow_lower_passes(tgt), *cpu.finalize_passes(tgt)]
    lower = tvm.transform.Sequential(passes)
    with tgt, tvm.transform.PassContext(opt_level=3):
        ex = relax.build(mod, target=tgt, relax_pipeline=lower)
    if out is not None:
        ex.export_library(out)
    return ex, applied


def _fast_functions(mod, tasks: Sequence[Workload]) -> set[str]:
    """Names of the fused module's PrimFuncs that are a task with fast math, found by the
    structural hash the task was keyed by (its function as extraction names it, ``main``)."""
    import tvm

    from ..workloads.schedule import mod_hash

    want = {w.prim.hash for w in tasks if w.fast_math}
    if not want:
        return set()
    return {gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)
            and mod_hash(tvm.IRModule({"main": f.with_attr("global_symbol", "main")})) in want}


def measure_model(path: str | Path, ratios: Sequence[float], db: TuningDatabase, *,
                  shapes: dict | None = None, options: ModelOptions | None = None,
                  progress: Callable[[str], None] | None = None) -> ModelResult:
    """Compile and run the model at ``path`` under every share of ``ratios`` (see the module doc);
    every variant's result is recorded in ``db`` as it is measured."""
    opt = options or ModelOptions()
    ratios = sorted({norm_ratio(check_ratio(r)) for r in ratios}, reverse=True)
    if not ratios:
        raise ConfigError("no shares to run the model at")
    say = progress or (lambda s: None)
    model = load_onnx(path, shapes)
    device = detect_cpu(opt.mcpu)
    partition = create_partition("cpu")
    db.add_device(device)
    tasks = extract_workloads(model, fast_math=opt.fast_math)
    result = ModelResult(model, device, partition.kind, time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}", tasks)
    feeds = random_feeds(model, opt.seed)
    with tempfile.TemporaryDirectory(prefix="spatialtune-model-") as tmp, partition:
        libs: dict[tuple, tuple[str, int, dict]] = {}

        def build(ratio: float | None, units: int) -> tuple[str, int, dict]:
            """The model with the configs tuned at ``ratio`` (None: untuned), for a share of ``units``."""
            if (ratio, units) not in libs:
                t0 = time.perf_counter()
                msdb, facts = (None, {}) if ratio is None else records_for(db, tasks, device, partition.kind, ratio,
                                                                           opt.interference)
                out = os.path.join(tmp, f"model-{ratio}-{units}.so")
                # the tuned variants build their tasks as they were measured (fast math where it
                # passed); untuned is TVM's own build, exact
                _, applied = compile_model(model, target_for(device, units), msdb, out, () if ratio is None else tasks)
                say(f"compiled {'untuned' if ratio is None else f'with the {ratio:g}% configs'} for {units} cores: "
                    f"{applied} of {len(tasks)} tasks tuned, {time.perf_counter() - t0:.1f} s")
                libs[(ratio, units)] = (out, applied, facts)
            return libs[(ratio, units)]

        for r in ratios:
            share = partition.grant(r)
            base = dict(run=result.run, model=model.name, model_hash=model.hash, device_id=device.id,
                        partition=partition.kind, ratio=share.key_ratio, granted_units=share.units,
                        n_tasks=len(tasks))
            plan = [("share-tuned", share.key_ratio), ("whole-tuned", 100.0), ("untuned", None)]
            built = {v: build(ratio, share.units) for v, ratio in plan}
            env = dict(os.environ) | partition.worker_env(share)
            with Worker(init="spatialtune.measure.in_worker:init_measure_worker", init_args=("cpu", share, "cpu"),
                        env=env, name=f"model-{share.units}core") as w:
                ort = _call(w, opt, "spatialtune.models.in_worker:run_onnxruntime", model.path, feeds, opt.settings())
                ref = ort.get("outputs")
                row = ModelRun(**base, variant="onnxruntime", status=ort["status"], error=ort.get("error", ""),
                               latency_s=ort.get("median_s"), times=ort.get("times", []),
                               detail={"version": ort.get("version"), "cores": ort.get("cores")})
                _keep(db, result, row, say)
                for variant, ratio in plan:
                    lib, applied, facts = built[variant]
                    res = _call(w, opt, "spatialtune.models.in_worker:run_compiled", lib,
                                [feeds[n] for n, _, _ in model.inputs], opt.settings())
                    row = ModelRun(**base, variant=variant, status=res["status"], error=res.get("error", ""),
                                   latency_s=res.get("median_s"), times=res.get("times", []), tuned_tasks=applied,
                                   trials=sum(f["trials"] for f in facts.values()) if facts else None,
                                   detail={"tasks": facts} if facts else {})
                    if row.status == "ok" and ref is not None:
                        row.rel_err, wrong = _compare(res["outputs"], ref)
                        if wrong:
                            row.status, row.error = "wrong_result", wrong
                    _keep(db, result, row, say)
    return result


def _call(w: Worker, opt: ModelOptions, fn: str, *args) -> dict:
    try:
        return {"status": "ok"} | dict(w.call(fn, *args, timeout=opt.timeout))
    except WorkerError as e:
        if not w.alive or e.kind != "error":
            w.restart()  # the next variant gets a fresh process holding the same share
        return {"status": "error", "error": str(e)}


def _compare(outs: list[np.ndarray], ref: list[np.ndarray]) -> tuple[float, str | None]:
    if len(outs) != len(ref):
        return float("inf"), f"{len(outs)} outputs, ONNX Runtime gives {len(ref)}"
    worst = 0.0
    for i, (o, r) in enumerate(zip(outs, ref)):
        err, wrong = check_output(o, r.astype(np.float64), CHECK_DTYPES.get(str(r.dtype), "int"))
        worst = max(worst, err)
        if wrong:
            return worst, f"output {i}: {wrong.replace('the float64 reference', 'ONNX Runtime')}"
    return worst, None


def _keep(db: TuningDatabase, result: ModelResult, row: ModelRun, say) -> None:
    record_model_run(db, row)
    result.rows.append(row)
    lat = f"{row.latency_s * 1e3:.3f} ms" if row.latency_s else row.error
    say(f"{row.ratio:g}% ({row.granted_units} cores) {row.variant}: {row.status} {lat}")
