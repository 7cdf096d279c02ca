"""A whole model under a share: compiled with per-share kernels, timed next to ONNX Runtime.

For each share, the model is compiled three ways and each is run under the share:

- **share-tuned**: every task's best config measured at this share (its tuning key's ratio);
- **whole-tuned**: every task's best config at 100 %, what an ordinary tuner hands out;
- **untuned**: TVM's default compilation (no schedule at all on a CPU);

and ONNX Runtime runs the same file on the same cores (intra-op threads = the share's cores, its
threads confined to them). Every variant's outputs are checked against ONNX Runtime's, on the same
random inputs. A task with no config for a variant runs untuned in it (``tuned_tasks`` says how
many had one). Each variant's latency is a row of ``model_runs`` (:mod:`spatialtune.store.model_runs`).

Timing holds against a drifting host: per share, every compiled variant is loaded once in one
worker and ONNX Runtime, as users run it (pool threads spinning while it runs), in a second worker
holding the same cores; then all are timed in ``rounds`` interleaved rounds (A B C D, A B C D, ...,
see :mod:`.in_worker`), a pause of :data:`SETTLE_S` before a slot that follows the other worker's,
so that neither's idle threads still spin on the cores the other is being timed on. A variant's
latency is the median of its rounds, ``times`` keeps each round's. Variants that are the same
kernels (every task's chosen record the same: share-tuned and whole-tuned at 100 %, or at a share
where every pick is the 100 % one; share-tuned and untuned where no task has a config) are
compiled and timed once; the other's row repeats the numbers and says
``same_as`` in its ``detail``. With ``profile``, ONNX Runtime's profiler then runs under the share
and :mod:`.profile` breaks the share-tuned latency down per task next to it (``detail["profile"]``).

Compilation (:func:`.compile.compile_model`, with each task's record from
:func:`.compile.records_for`) is described in :mod:`.compile`.

Runs happen in a measuring worker (:class:`spatialtune.measure.worker.Worker`) that holds the
share through the partition (CPU core sets here; a GPU share runs the models a bundle carries,
:mod:`.share_export`).
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
from ..workloads.fastmath import approximable
from ..workloads.spec import Workload
from .compile import compile_model, records_for
from .cold import ColdPicker
from .importer import ImportedModel, extract_workloads, load_onnx
from .profile import Breakdown, breakdown, call_order, output_sizes

log = logging.getLogger(__name__)

SETTLE_S = 0.25
"""Idle time before a slot in the other worker than the slot before: TVM's pool threads spin
(``sched_yield``) for about 0.15 s after their last parallel job before they sleep, and would take
the cores from ONNX Runtime's threads (measured: ONNX Runtime at one core's speed on two)."""

CHECK_DTYPES = {"float32": "fp32", "float16": "fp16", "float64": "fp64"}


@dataclass
class ModelOptions:
    rounds: int = 10  # interleaved rounds per share; each variant's median round counts
    min_repeat_ms: int = 100  # a variant's slot in a round runs the model at least this long (at least once)
    warmup_ms: int = 100  # untimed runs of each variant when it is loaded
    timeout: float = 900.0  # per call into the worker: a variant's load, one round's slot, the profile
    seed: int = 0  # the random inputs
    mcpu: str | None = None  # the device whose tuning records are used (default: this machine's CPU)
    interference: str = "none"  # whose records: the condition they were tuned under
    fast_math: bool = True  # tasks build with vectorisable erf/exp/tanh where that passes the check
    profile: bool = False  # also break the share-tuned latency down per task next to ONNX Runtime's profile
    layout: str = "auto"  # of the convolutions, as the tasks were extracted (models.layout)
    rerank_cold: int = 0  # share-tuned: of each task's this many fastest kernels, the fastest out of cache (.cold)

    def settings(self) -> dict:
        return {"rounds": self.rounds, "min_repeat_ms": self.min_repeat_ms, "warmup_ms": self.warmup_ms}


@dataclass
class ModelResult:
    model: ImportedModel
    device: DeviceInfo
    partition: str
    run: str
    tasks: list[Workload]
    rows: list[ModelRun] = field(default_factory=list)
    profiles: dict[float, Breakdown] = field(default_factory=dict)  # per share key ratio, with --profile

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


def measure_model(path: str | Path, ratios: Sequence[float], db: TuningDatabase, *,
                  shapes: dict | None = None, options: ModelOptions | None = None,
                  progress: Callable[[str], None] | None = None) -> ModelResult:
    """Compile and run the model at ``path`` under every share of ``ratios`` (see the module doc);
    every variant's result is recorded in ``db`` once its share is measured."""
    opt = options or ModelOptions()
    ratios = sorted({norm_ratio(check_ratio(r)) for r in ratios}, reverse=True)
    if not ratios:
        raise ConfigError("no shares to run the model at")
    if opt.rounds < 1 or opt.min_repeat_ms < 0 or opt.timeout <= 0 or opt.rerank_cold < 0:
        raise ConfigError("rounds must be at least 1, min_repeat_ms and rerank_cold not negative, timeout positive")
    model = load_onnx(path, shapes, opt.layout)
    device = detect_cpu(opt.mcpu)
    partition = create_partition("cpu")
    db.add_device(device)
    tasks = extract_workloads(model, fast_math=opt.fast_math)
    result = ModelResult(model, device, partition.kind, time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}", tasks)
    run = _ModelRun(result, db, opt, partition, random_feeds(model, opt.seed), progress or (lambda s: None))
    plans = [run.plan(partition.grant(r)) for r in ratios]
    run.calls = call_order(model, tasks, run.functions) if opt.profile else []
    with tempfile.TemporaryDirectory(prefix="spatialtune-model-") as tmp, partition:
        run.tmp = tmp
        # the tuned variants build their tasks as they were measured (fast math where it passed);
        # untuned is TVM's own build, exact
        run.fast = [w for w in tasks if w.fast_math and approximable(w.ir_module())]
        for share, plan in plans:
            run.measure_share(share, run.rerank(share, plan) if opt.rerank_cold > 0 else plan)
    return result


@dataclass
class _ModelRun:
    """One :func:`measure_model` call, what its shares have in common: the model and its tasks, the
    inputs, where rows go, and the libraries compiled so far (a share's variant that is the same
    kernels as one already built reuses its library)."""

    result: ModelResult
    db: TuningDatabase
    opt: ModelOptions
    partition: object
    feeds: dict[str, np.ndarray]
    say: Callable[[str], None]
    calls: list = field(default_factory=list)  # the tasks in call order, with --profile
    functions: dict = field(default_factory=dict)  # the compiled model's function names -> task keys
    tmp: str = ""
    fast: list[Workload] = field(default_factory=list)
    # (cores, each task's kernel, fast) -> (library, tasks tuned)
    libs: dict[tuple, tuple[str, int]] = field(default_factory=dict)

    def plan(self, share) -> tuple[object, dict]:
        """The share and its variants' records: {variant: (MetaSchedule database or None, facts)}."""
        r, opt, kind = self.result, self.opt, self.partition.kind
        plan = {v: (None, {}) if ratio is None else records_for(self.db, r.tasks, r.device, kind, ratio,
                                                                 opt.interference)
                for v, ratio in (("share-tuned", share.key_ratio), ("whole-tuned", 100.0), ("untuned", None))}
        if opt.profile and not any(f["time_s"] for f in plan["share-tuned"][1].values()):
            raise ConfigError(f"--profile: no task of {r.model.name} has a tuned config at {share.key_ratio:g}% on "
                              f"{r.device.id} ({kind}, interference {opt.interference}): tune it first "
                              f"(spatialtune workloads --from-onnx, then spatialtune tune)")
        return share, plan

    def rerank(self, share, plan: dict) -> dict:
        """``plan`` with its share-tuned records chosen out of cache (:mod:`.cold`)."""
        r, opt = self.result, self.opt
        picker = ColdPicker(r.device, share, dict(os.environ) | self.partition.worker_env(share), self.tmp,
                            opt.rerank_cold, say=self.say)
        try:
            return plan | {"share-tuned": records_for(self.db, r.tasks, r.device, self.partition.kind, share.key_ratio,
                                                      opt.interference, pick=picker)}
        finally:
            picker.close()

    def measure_share(self, share, plan: dict) -> None:
        """Every variant of ``plan`` compiled, timed next to ONNX Runtime under ``share``, and recorded."""
        r, opt = self.result, self.opt
        same_as, idents = self._compile_variants(share, plan)
        base = dict(run=r.run, model=r.model.name, model_hash=r.model.hash, device_id=r.device.id,
                    partition=self.partition.kind, ratio=share.key_ratio, granted_units=share.units,
                    n_tasks=len(r.tasks))
        loads = [("onnxruntime", "load_onnxruntime", (r.model.path, self.feeds, opt.settings() | {"spinning": True}),
                  "ort")]
        loads += [(v, "load_compiled", (self.libs[idents[v]][0], [self.feeds[n] for n, _, _ in r.model.inputs],
                                        opt.settings()), "tvm") for v in plan if same_as[v] == v]
        res, prof = self._time(share, loads)
        ort = res["onnxruntime"]
        rows = {"onnxruntime": ModelRun(**base, variant="onnxruntime", status=ort["status"],
                                        error=ort.get("error", ""), latency_s=ort.get("median_s"),
                                        times=ort["times"], detail={"version": ort.get("version"),
                                                                    "cores": ort.get("cores"), "spinning": True})}
        for v, (_, facts) in plan.items():
            src = res[same_as[v]]
            row = rows[v] = ModelRun(**base, variant=v, status=src["status"], error=src.get("error", ""),
                                     latency_s=src.get("median_s"), times=src["times"],
                                     tuned_tasks=self.libs[idents[v]][1],
                                     trials=sum(f["trials"] for f in facts.values()) if facts else None,
                                     detail={"tasks": facts} if facts else {})
            if facts and opt.interference != "none":  # the model ran alone; its kernels were tuned so
                row.detail["records"] = opt.interference
            if same_as[v] != v:
                row.detail["same_as"] = same_as[v]
            _check_outputs(row, src, ort.get("outputs"))
        self._attach_profile(share, plan, rows["share-tuned"], prof)
        for row in rows.values():
            _keep(self.db, r, row, self.say)

    def _compile_variants(self, share, plan: dict) -> tuple[dict[str, str], dict[str, tuple]]:
        """Each variant's library, compiled unless the same kernels were; per variant the first
        variant of this share it is the same kernels as (itself if none), and its library's key."""
        r = self.result
        same_as: dict[str, str] = {}
        idents: dict[str, tuple] = {}
        for v, (msdb, facts) in plan.items():  # the same kernels are one compiled model, timed once
            idents[v] = ident = (share.units, tuple(facts.get(w.key, {}).get("mod_hash") for w in r.tasks),
                                 bool(self.fast) and msdb is not None)
            same_as[v] = next(u for u in idents if idents[u] == ident)
            if ident not in self.libs:
                self.libs[ident] = _compile(r.model, r.device, share.units, msdb, self.tmp, v,
                                            r.tasks if ident[2] else (), self.say)
        return same_as, idents

    def _time(self, share, loads: list[tuple]) -> tuple[dict[str, dict], dict | None]:
        """The variants' interleaved rounds, the compiled ones in one worker holding the share and
        ONNX Runtime in another, then ONNX Runtime's profile (with ``--profile``)."""
        model, opt = self.result.model, self.opt
        init = share_worker(self.partition, share)
        with Worker(**init, name=f"model-{share.units}core") as w, Worker(**init, name=f"ort-{share.units}core") as o:
            res = _interleave({"tvm": w, "ort": o}, opt, loads, self.say)
            if opt.profile:  # where no TVM pool thread is left spinning
                _settle()
                prof = _call(o, opt, f"{_W}:profile_onnxruntime", model.path, self.feeds, opt.settings(),
                             os.path.join(self.tmp, f"ort-{share.units}"))
                if prof["status"] == "ok" and res.get("share-tuned", {}).get("status") == "ok":
                    _settle()  # and the share-tuned model where ORT's threads sleep
                    inside = _call(w, opt, f"{_W}:profile_compiled", "share-tuned", opt.settings())
                    prof["in_model"] = inside if inside["status"] == "ok" else None
            else:
                prof = None
        return res, prof

    def _attach_profile(self, share, plan: dict, st: ModelRun, prof: dict | None) -> None:
        """With --profile: the share-tuned latency broken down per task, or why it could not be."""
        if prof is not None and prof["status"] == "ok" and st.latency_s:
            bd = breakdown(share.key_ratio, self.calls, plan["share-tuned"][1], st.latency_s, prof,
                           prof.get("in_model"), self.functions, output_sizes(self.result.tasks))
            st.detail["profile"] = bd.to_dict()
            self.result.profiles[share.key_ratio] = bd
        elif prof is not None:
            st.detail["profile_error"] = prof.get("error") or "the share-tuned model has no latency"


def _check_outputs(row: ModelRun, src: dict, ref: list[np.ndarray] | None) -> None:
    """A variant that ran is checked against ONNX Runtime's outputs; ``wrong_result`` if it differs."""
    if row.status == "ok" and ref is not None:
        row.rel_err, wrong = _compare(src["outputs"], ref)
        if wrong:
            row.status, row.error = "wrong_result", wrong


_W = "spatialtune.models.in_worker"


def _compile(model, device, units: int, msdb, tmp: str, variant: str, fast_tasks: Sequence[Workload],
             say) -> tuple[str, int]:
    t0 = time.perf_counter()
    out = os.path.join(tmp, f"model-{variant}-{units}-{len(os.listdir(tmp))}.so")
    _, applied = compile_model(model, target_for(device, units), msdb, out, fast_tasks)
    say(f"compiled {variant} for {units} cores: {applied} tasks tuned, {time.perf_counter() - t0:.1f} s")
    return out, applied


def _interleave(workers: dict[str, Worker], opt: ModelOptions, loads: list[tuple], say) -> dict[str, dict]:
    """Load every variant of ``loads`` ((name, loader in in_worker, its arguments, key of the worker
    in ``workers``)) in its worker, then time them in ``opt.rounds`` round-robin rounds, pausing
    :data:`SETTLE_S` before a slot in another worker than the slot before; per variant its load's
    answer (status, outputs, ...) with ``times`` (one per round) and ``median_s``. A call that kills
    a worker fails its variant; the others loaded in it are loaded again into the fresh one and go on."""
    out: dict[str, dict] = {}
    last = [None]

    def call(name: str, key: str, fn: str, *args) -> dict:
        w = workers[key]
        if fn == "time_slot" and last[0] not in (None, key):
            _settle()
        last[0] = key
        pid = w.pid
        res = _call(w, opt, f"{_W}:{fn}", *args)
        if w.pid != pid:  # a fresh process: the variants loaded in the old one are gone
            for n, loader, a, k in loads:
                if k == key and n != name and out.get(n, {}).get("status") == "ok":
                    again = _call(w, opt, f"{_W}:{loader}", n, *a)
                    if again["status"] != "ok":
                        out[n] |= {"status": "error", "error": f"loading again after {name} failed: {again['error']}"}
        return res

    for name, loader, args, key in loads:
        out[name] = call(name, key, loader, name, *args) | {"times": []}
        if out[name]["status"] != "ok":
            say(f"{name}: {out[name]['error']}")
    for k in range(opt.rounds):
        for name, _, _, key in loads:
            if out[name]["status"] == "ok":
                res = call(name, key, "time_slot", name, opt.settings())
                if res["status"] == "ok":
                    out[name]["times"].append(res["time_s"])
                else:
                    out[name] |= {"status": "error", "error": f"round {k + 1}: {res['error']}"}
    for r in out.values():
        if r["status"] == "ok":
            r["median_s"] = float(np.median(r["times"]))
    return out


def share_worker(partition, share) -> dict:
    """The arguments of a :class:`~spatialtune.measure.worker.Worker` that holds ``share`` of the
    CPU ``partition`` (its environment and the measuring worker's set-up)."""
    return dict(init="spatialtune.measure.in_worker:init_measure_worker", init_args=("cpu", share, "cpu"),
                env=dict(os.environ) | partition.worker_env(share))


def _settle() -> None:
    time.sleep(SETTLE_S)


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
