"""The tuning loop: for each workload and each share, search, build, measure, record, learn.

``tune()`` is the library entry point behind ``spatialtune tune``. Everything it learns goes to
the database as it happens (one transaction per measurement, written as each measurement
completes), and everything it starts from is read back from there, so a job killed at any point
and started again with the same arguments continues where it stopped: the trials already
measured count toward the budget and are never proposed again. The budget is re-read from the
database before every batch, so several jobs on one key stop within a batch each of it.

Shares are tuned in descending order. What to measure at each one comes from the one policy
(:mod:`spatialtune.search.policy`): the configs best elsewhere first (transfers), then the
evolutionary search with this share's cost model.

Two ways to spend ``trials`` (``TuneOptions.scheduler``): ``each`` gives every (workload, share)
that many, workload by workload; ``gradient``, for the tasks of a model, gives each share that
many across the tasks, batch by batch to where weight x measured time says they gain most
(:mod:`.scheduler`, as MetaSchedule's gradient task scheduler does).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Sequence

from ..device import DeviceInfo, target_for
from ..errors import ConfigError
from ..measure.builder import BuildInput, Builder, LocalBuilder
from ..measure.runner import LocalRunner, Runner, RunInput
from ..partitions import Partition
from ..search.cost_model import CostModel, create_cost_model
from ..search.policy import KeyId, SharePolicy, TrainingSet, fit_share_model, winner_origins
from ..search.siblings import signature_or_none
from ..search.space import Candidate
from ..store.database import Measurement, TuningDatabase
from ..store.model_runs import vendor_floors
from ..store.paths import artifact_dir
from ..terms import Share, check_ratio, norm_ratio
from ..workloads.spec import Workload
from .baselines import measure_baselines
from .confirm import confirm_best
from .context import TuneContext
from .matrix import check_imported, fill_matrix
from .lanes import ProgressFn, device_and_partition, in_threads, serialised
from .options import ShareResult, TuneOptions, TuneSummary
from .scheduler import TaskState, pick_task

log = logging.getLogger(__name__)



class _Stage:
    def __init__(self):
        self.t = {"setup": 0.0, "search": 0.0, "build": 0.0, "run": 0.0, "train": 0.0, "baseline": 0.0}
        self.counts = {"built": 0, "measured": 0}
        self.gaps: list[str] = []  # winners-matrix cells that could not be measured, and why
        self._lock = threading.Lock()  # workloads tuned in threads add to the same totals

    def add(self, k: str, dt: float) -> None:
        with self._lock:
            self.t[k] += dt

    def count(self, k: str, n: int) -> None:
        with self._lock:
            self.counts[k] += n


def tune(workloads: Sequence[Workload], ratios: Sequence[float], db: TuningDatabase,
         options: TuneOptions | None = None, *, progress: ProgressFn | None = None,
         runner: Runner | None = None, builder: Builder | None = None) -> TuneSummary:
    """Tune every workload at every ratio into ``db``; see the module docstring.

    ``runner`` replaces the local measuring runner (e.g. a ReplayRunner, or a pool of measuring
    servers, whose device and partition then key the records); the caller owns it. A runner that
    measures several candidates at once (``parallel`` > 1) gets several workloads tuned at once,
    each in its own thread with its own database connection. ``builder`` replaces the local
    builder in the same way (the caller owns it).
    """
    opt = options or TuneOptions()
    opt.validate()
    if not workloads:
        raise ConfigError("no workloads to tune")
    ratios = sorted({norm_ratio(check_ratio(r)) for r in ratios}, reverse=True)
    t_start = time.perf_counter()
    device, partition = device_and_partition(opt, runner)
    db.add_device(device)
    for w in workloads:
        db.add_workload(w)
    art = Path(opt.artifact_dir or artifact_dir(db.path)) / device.id
    stage = _Stage()
    deadline = None if opt.time_budget_s is None else t_start + opt.time_budget_s
    own_runner = runner is None
    if own_runner:
        # Operator workloads are checked against numpy, so their measuring workers only load and
        # run kernels: TVM's runtime library is enough (0.4 s to import instead of 1.5, 80 MB
        # instead of 190). A PrimFunc task's reference is compiled in the worker: full TVM.
        lean = opt.target == "cpu" and all(w.prim is None for w in workloads)
        runner = LocalRunner(partition, device_kind=opt.target, settings=opt.run,
                             extra_env={"TVM_USE_RUNTIME_LIB": "1"} if lean else None)
    lanes = min(runner.parallel, len(workloads))
    if lanes > 1 and progress is not None:
        progress = serialised(progress)
    own_builder = builder is None
    if own_builder:
        builder = LocalBuilder(art, workers=opt.build_workers, relative_timeout=opt.build_deadline)
    with partition, (builder if own_builder else contextlib.nullcontext(builder)), \
            (runner if own_runner else contextlib.nullcontext(runner)):
        def tune_workload(wi: int, job_db: TuningDatabase) -> tuple[list[ShareResult], bool]:
            job = _Job(job_db, device, partition, opt, builder, runner, stage, progress, deadline)
            out = []
            for ri, r in enumerate(ratios):
                if job.out_of_time():
                    return out, True
                out.append(job.tune_share(workloads[wi], r, position=(wi, len(workloads), ri, len(ratios))))
            if runner.real:
                fill_matrix(job, workloads[wi])
            return out, False

        def tune_tasks() -> tuple[list[ShareResult], bool]:
            # A model's tasks: the trials of each share go where the time is, one task at a time.
            job = _Job(db, device, partition, opt, builder, runner, stage, progress, deadline)
            out = []
            for ri, r in enumerate(ratios):
                if job.out_of_time():
                    return out, True
                out += job.tune_tasks(workloads, r, position=(0, 1, ri, len(ratios)))
            for w in workloads if runner.real else []:
                fill_matrix(job, w)
            return out, False

        if opt.scheduler == "gradient":
            done = [tune_tasks()]
        elif lanes > 1:
            done = in_threads(tune_workload, len(workloads), lanes, db.path)
        else:
            done = []
            for wi in range(len(workloads)):
                done.append(tune_workload(wi, db))
                if done[-1][1]:
                    break
        results = [res for out, _ in done for res in out]
        stopped = any(s for _, s in done)
        # The whole-device column needs every share tuned first.
        job = _Job(db, device, partition, opt, builder, runner, stage, progress, deadline)
        origins: dict[str, dict] = {}
        for res in results:
            res.whole_device_config_s = job.whole_device_time(res.workload_key, res.ratio)
            if res.workload_key not in origins:
                origins[res.workload_key] = winner_origins(db.measurements(
                    workload_key=res.workload_key, device_id=device.id, partition=partition.kind))
            o = origins[res.workload_key].get(KeyId(partition.kind, res.ratio, opt.interference))
            res.origin = o.label() if o else ""
            # the winners matrix ran after the share's result was taken: its best may be newer
            best = db.best(workload_key=res.workload_key, device_id=device.id, partition=partition.kind,
                           ratio=res.ratio, interference=opt.interference)
            res.best_s = best[0].median_s if best else res.best_s
    return TuneSummary(device=device, partition=partition.kind, interference=opt.interference, results=results,
                       elapsed_s=time.perf_counter() - t_start, timings=dict(stage.t) | stage.counts,
                       stopped_early=stopped, matrix_gaps=list(stage.gaps))


class _Job:
    def __init__(self, db: TuningDatabase, device: DeviceInfo, partition: Partition, opt: TuneOptions,
                 builder: LocalBuilder, runner: Runner, stage: _Stage, progress, deadline):
        self.db, self.device, self.partition, self.opt = db, device, partition, opt
        self.builder, self.runner = builder, runner
        self.stage, self.progress, self.deadline = stage, progress, deadline
        self.models: dict[float, CostModel] = {}
        self._data: TrainingSet | None = None
        self._signatures: list | None = None  # of a model's tasks, for their siblings

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def key(self, w: Workload, r: float) -> dict:
        return dict(workload_key=w.key, device_id=self.device.id, partition=self.partition.kind, ratio=r,
                    interference=self.opt.interference)

    # -- cost models: one per share, trained on every share of the condition -------------------

    def data(self) -> TrainingSet:
        if self._data is None:
            self._data = TrainingSet(self.device.units)
            self._data.add_rows(self.db.measurements(device_id=self.device.id, partition=self.partition.kind,
                                                     interference=self.opt.interference, status="ok",
                                                     with_features=True))
        return self._data

    def model_for(self, r: float) -> CostModel:
        if r not in self.models:
            saved = self.db.load_cost_model(self.device.id, self.partition.kind, r, self.opt.interference)
            model = None
            if saved and saved.kind == self.opt.cost_model:
                model = CostModel.from_json(saved.model)
            if model is None or model.n_samples != len(self.data()):
                model = create_cost_model(self.opt.cost_model, seed=self.opt.seed)
                self._fit(r, model)
            self.models[r] = model
        return self.models[r]

    def _fit(self, r: float, model: CostModel) -> None:
        t0 = time.perf_counter()
        po = self.opt.policy()
        if fit_share_model(model, self.data(), r, po.own_share_weight, po.transfer_fade_rows):
            self.db.save_cost_model(self.device.id, self.partition.kind, r, self.opt.interference, model.kind,
                                    model.to_json(), len(self.data()))
        self.stage.add("train", time.perf_counter() - t0)

    # -- one share ---------------------------------------------------------------------------

    def tune_share(self, w: Workload, r: float, position: tuple) -> ShareResult:
        share = self.partition.grant(r)
        key = self.key(w, share.key_ratio)
        check_imported(self, w, share, key)
        before = self.db.count_measurements(**key)
        if before < self.opt.trials and not self.out_of_time():
            search = _KeySearch(self, w, share, key)
            try:
                while not self.out_of_time():
                    want = self.opt.trials - self.db.count_measurements(**key)  # other jobs may share the key
                    if want <= 0 or not search.step(want):
                        break
                    self._report(w, share.key_ratio, share, key, position)
            finally:
                search.close()
            self._confirm(w, share, key)
        return self._share_result(w, share, key, before)

    def tune_tasks(self, ws: Sequence[Workload], r: float, position: tuple) -> list[ShareResult]:
        """The tasks of a model at one share, ``opt.trials`` trials across them, each batch to the
        task furthest below its due share of weight x time (:mod:`.scheduler`)."""
        share = self.partition.grant(r)
        keys = [self.key(w, share.key_ratio) for w in ws]
        for w, k in zip(ws, keys):
            check_imported(self, w, share, k)
        before = [self.db.count_measurements(**k) for k in keys]
        searches: dict[int, _KeySearch] = {}
        floors = vendor_floors(self.db, self.device.id, self.partition.kind, share.key_ratio)
        states = [TaskState(w.name or w.key, w.weight, n, None, floor_s=floors.get(w.key)) for w, n in zip(ws, before)]
        try:
            while not self.out_of_time():
                for st, k in zip(states, keys):  # other jobs may share the keys
                    st.spent = self.db.count_measurements(**k)
                    best = self.db.best(**k)
                    st.best_s = best[0].median_s if best else None
                left = self.opt.trials - sum(st.spent for st in states)
                i = pick_task(states, min(self.opt.batch, left)) if left > 0 else None
                if i is None:
                    break
                if i not in searches:
                    searches[i] = _KeySearch(self, ws[i], share, keys[i], self._siblings(ws, keys, i))
                if not searches[i].step(left):
                    states[i].done = True
                    continue
                self._report(ws[i], share.key_ratio, share, keys[i], position,
                             (sum(self.db.count_measurements(**k) for k in keys), self.opt.trials))
        finally:
            for s in searches.values():
                s.close()
        for i in searches:
            self._confirm(ws[i], share, keys[i])
        return [self._share_result(w, share, k, n) for w, k, n in zip(ws, keys, before)]

    def _siblings(self, ws: Sequence[Workload], keys: Sequence[dict], i: int) -> list[tuple]:
        """(workload, best traces) of the tasks with ``ws[i]``'s main computation that have kernels
        measured under their key already (:mod:`spatialtune.search.siblings`)."""
        if self._signatures is None:
            self._signatures = [signature_or_none(w) for w in ws]
        sig, top = self._signatures[i], self.opt.policy().sibling_top
        out = []
        for j, (w, k) in enumerate(zip(ws, keys)):
            if j == i or sig is None or self._signatures[j] != sig or top <= 0:
                continue
            ok = sorted((m for m in self.db.measurements(**k) if m.status == "ok"), key=lambda m: m.median_s)
            if ok:
                out.append((w, [m.trace for m in ok[:top]]))
        return out

    def _confirm(self, w: Workload, share: Share, key: dict) -> None:
        if self.runner.real and self.opt.confirm_top and not self.out_of_time():
            t0 = time.perf_counter()
            confirm_best(TuneContext(self.db, self.builder, self.runner, w, share, key, self.target(share)),
                         top=self.opt.confirm_top)
            self.stage.add("run", time.perf_counter() - t0)

    def _share_result(self, w: Workload, share: Share, key: dict, before: int) -> ShareResult:
        if self.opt.baselines and self.runner.baselines:  # a replay has no hardware to time them on
            t0 = time.perf_counter()
            measure_baselines(self.db, self.builder, self.runner, w, share, key, target_for(self.device, share.units))
            self.stage.add("baseline", time.perf_counter() - t0)
        best = self.db.best(**key)
        base = {b["kind"]: b["median_s"] for b in self.db.baselines(**key)}
        n = self.db.count_measurements(**key)
        return ShareResult(w.key, w.name, share.key_ratio, share.units, share.unit, best[0].median_s if best else None,
                           n, n - before, None, base.get("tvm-default"), base.get("numpy"))

    def measure(self, w: Workload, share: Share, key: dict, cands: Sequence[Candidate]) -> list[float | None]:
        """Build and measure ``cands`` under ``key``'s neighbour; each result is recorded the
        moment it exists."""
        t0 = time.perf_counter()
        built = self.builder.build([BuildInput.of(c, w.key, w.fast_math) for c in cands], self.target(share))
        self.stage.add("build", time.perf_counter() - t0)
        self.stage.count("built", len(cands))
        times: list[float | None] = [None] * len(cands)

        def row(i: int) -> Measurement:
            c, b = cands[i], built[i]
            return Measurement(**key, mod_hash=c.mod_hash, trace=c.trace, status="build_error", error=b.error,
                               features=c.features, source=c.source, search_s=c.search_s, build_s=b.build_s,
                               granted_units=share.units, granted_share=share.fraction)

        for i, b in enumerate(built):
            if not b.ok:
                self.db.record(row(i))
        ok = [i for i, b in enumerate(built) if b.ok]

        def on_result(j: int, res) -> None:
            i = ok[j]
            m = row(i)
            m.status, m.error, m.times, m.median_s = res.status, res.error, res.times, res.median_s
            m.rel_err, m.run_s = res.rel_err, res.run_s
            m.granted_units = res.granted_units or share.units
            m.granted_share = m.granted_units / share.total
            m.neighbour_throughput, m.neighbour_unit = res.neighbour_throughput, res.neighbour_unit
            self.db.record(m)
            times[i] = m.median_s if m.status == "ok" else None

        t0 = time.perf_counter()
        self.runner.run(share, key["interference"],
                        [RunInput(w.to_dict(), built[i].artifact, built[i].cubin, cands[i].mod_hash) for i in ok],
                        on_result=on_result)
        self.stage.add("run", time.perf_counter() - t0)
        self.stage.count("measured", len(ok))
        return times

    def target(self, share: Share) -> dict:
        return target_for(self.device, share.units)

    def _learn(self, r: float, model: CostModel, cands, times, wkey: str, share: Share) -> None:
        data = self.data()
        for c, t in zip(cands, times):
            if t is not None:
                data.add(c.features, t, wkey, r, share.units)
        self._fit(r, model)

    def _report(self, w: Workload, r: float, share: Share, key: dict, position, spent: tuple | None = None) -> None:
        """``spent``: (trials, budget) of a model's share when they are counted across its tasks."""
        if self.progress is None:
            return
        best = self.db.best(**key)
        trials, budget = spent or (self.db.count_measurements(**key), self.opt.trials)
        self.progress({"workload": w.name or w.key, "key": w.key, "ratio": r, "share": share.describe(),
                       "trials": trials, "budget": budget, "best_s": best[0].median_s if best else None,
                       "flops": w.flops, "position": position})

    def whole_device_time(self, wkey: str, r: float) -> float | None:
        """Time, at share r, of the config that is best at 100% (None if either is missing)."""
        full = self.db.best(workload_key=wkey, device_id=self.device.id, partition=self.partition.kind, ratio=100.0,
                            interference=self.opt.interference)
        if not full:
            return None
        for m in self.db.measurements(workload_key=wkey, device_id=self.device.id, partition=self.partition.kind,
                                      ratio=r, interference=self.opt.interference, status="ok"):
            if m.mod_hash == full[0].mod_hash:
                return m.median_s
        return None


class _KeySearch:
    """The search of one (workload, share) key: its policy, the transfers still to measure, and one
    batch per :meth:`step` (built, measured and recorded, the share's model retrained)."""

    def __init__(self, job: _Job, w: Workload, share: Share, key: dict, siblings: Sequence[tuple] = ()):
        t0 = time.perf_counter()
        self.job, self.w, self.share, self.key = job, w, share, key
        r = share.key_ratio
        rows = job.db.measurements(workload_key=w.key, device_id=job.device.id, with_features=True)
        self.model = job.model_for(r)
        self.policy = SharePolicy(w, target_for(job.device, share.units),
                                  KeyId(job.partition.kind, r, job.opt.interference), rows, self.model,
                                  share_units=(share.units, share.total), options=job.opt.policy(),
                                  run=job.opt.search_run())
        job.stage.add("setup", time.perf_counter() - t0)
        self.pending = self.policy.transfers(siblings)

    def step(self, want: int) -> bool:
        """Measure the next batch, at most ``want`` candidates (all pending transfers first);
        False when the search space is exhausted."""
        job = self.job
        t0 = time.perf_counter()
        if self.pending:
            cands, self.pending = self.pending[:want], self.pending[want:]
        else:
            cands = self.policy.ask(min(job.opt.batch, want))
        job.stage.add("search", time.perf_counter() - t0)
        if not cands:
            log.info("%s @ %g%%: search space exhausted", self.w.key, self.share.key_ratio)
            return False
        times = job.measure(self.w, self.share, self.key, cands)
        self.policy.tell(cands, times)
        job._learn(self.share.key_ratio, self.model, cands, times, self.w.key, self.share)
        return True

    def close(self) -> None:
        self.policy.close()
