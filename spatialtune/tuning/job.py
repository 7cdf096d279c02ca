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

The runner decides where and when the measurements happen (``measure.runner.Runner``): this
machine's workers, measuring servers (:mod:`spatialtune.distributed`), or a GPU bundle measured
later on another host (a deferred runner, :mod:`spatialtune.bundle.pack`). Whichever it is, every
batch goes through the same after-batch steps (:mod:`.after_batch`: record the rows, retrain the
share's model, report progress, and what the caller adds). A deferred runner's results are
pending: nothing is recorded for them, they count toward the key's budget within this call, and a
key stops once its next batch would wait on them; ``bundle import`` records the measurements, and
the same call made again goes on from the database, as after a kill.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Sequence

from ..device import target_for
from ..errors import ConfigError
from ..measure.builder import BuildInput, Builder, LocalBuilder
from ..measure.runner import LocalRunner, MeasureResult, Runner, RunInput
from ..search.policy import winner_origins
from ..search.siblings import signature_or_none
from ..search.space import Candidate, candidate_from_trace
from ..store.database import TuningDatabase
from ..store.model_runs import vendor_floors
from ..store.paths import artifact_dir
from ..terms import WHOLE, Condition, Share, check_ratio, norm_ratio
from ..workloads.spec import Workload
from .after_batch import AfterBatch, Batch, default_after_batch
from .baselines import measure_baselines
from .confirm import confirm_best
from .context import Context, TuneContext
from .keysearch import KeySearch
from .lanes import ProgressFn, device_and_partition, in_threads, serialised
from .matrix import check_imported, fill_matrix, measure_samples
from .models import ShareModels
from .options import TuneOptions
from .results import ShareResult, TuneSummary
from .scheduler import TaskState, first_round, pick_task

log = logging.getLogger(__name__)


def tune(workloads: Sequence[Workload], ratios: Sequence[float], db: TuningDatabase,
         options: TuneOptions | None = None, *, progress: ProgressFn | None = None,
         runner: Runner | None = None, builder: Builder | None = None,
         after_batch: Sequence[AfterBatch] = ()) -> TuneSummary:
    """Tune every workload at every ratio into ``db``; see the module docstring.

    ``runner`` replaces the local measuring runner (e.g. a ReplayRunner, a pool of measuring
    servers, whose device and partition then key the records, or a bundle); the caller owns it.
    A runner that measures several candidates at once (``parallel`` > 1) gets several workloads
    tuned at once, each in its own thread with its own database connection. ``builder`` replaces
    the local builder in the same way (the caller owns it). ``after_batch``: steps run after
    every measured batch, after the default ones (:mod:`.after_batch`).
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
    own_runner, own_builder = runner is None, builder is None
    runner = runner or _local_runner(opt, partition, workloads)
    builder = builder or LocalBuilder(Path(opt.artifact_dir or artifact_dir(db.path)) / device.id,
                                      workers=opt.build_workers, relative_timeout=opt.build_deadline)
    lanes = min(runner.parallel, len(workloads))
    if lanes > 1 and progress is not None:
        progress = serialised(progress)
    ctx = Context(device, partition, opt, builder, runner, progress,
                  None if opt.time_budget_s is None else t_start + opt.time_budget_s,
                  after_batch=default_after_batch() + list(after_batch))
    with partition, (builder if own_builder else contextlib.nullcontext(builder)), \
            (runner if own_runner else contextlib.nullcontext(runner)):
        results, stopped = _run_jobs(ctx, db, workloads, ratios, lanes)
        _complete(_Job(db, ctx), results)
    return TuneSummary(device=device, partition=partition.kind, interference=opt.interference, results=results,
                       elapsed_s=time.perf_counter() - t_start, timings=dict(ctx.stage.t) | ctx.stage.counts,
                       stopped_early=stopped, matrix_gaps=list(ctx.stage.gaps), pending=ctx.n_pending())


def _local_runner(opt: TuneOptions, partition, workloads: Sequence[Workload]) -> LocalRunner:
    # Operator workloads are checked against numpy, so their measuring workers only load and run
    # kernels: TVM's runtime library is enough (a faster import, a smaller process). A PrimFunc
    # task's reference is compiled in the worker: full TVM.
    lean = opt.target == "cpu" and all(w.prim is None for w in workloads)
    return LocalRunner(partition, device_kind=opt.target, settings=opt.run,
                       extra_env={"TVM_USE_RUNTIME_LIB": "1"} if lean else None)


def _run_jobs(ctx: Context, db: TuningDatabase, workloads: Sequence[Workload], ratios: list[float],
              lanes: int) -> tuple[list[ShareResult], bool]:
    """Every share of every workload, workload by workload (in threads when the runner measures
    several at once) or, for a model's tasks, share by share across them; (results, stopped)."""
    def tune_workload(wi: int, job_db: TuningDatabase) -> tuple[list[ShareResult], bool]:
        job = _Job(job_db, ctx)
        out = []
        for ri, r in enumerate(ratios):
            if ctx.out_of_time():
                return out, True
            out.append(job.tune_share(workloads[wi], r, position=(wi, len(workloads), ri, len(ratios)),
                                      first=ri == 0))
        if ctx.runner.real:
            fill_matrix(job, workloads[wi])
        return out, False

    def tune_tasks() -> tuple[list[ShareResult], bool]:
        # A model's tasks: the trials of each share go where the time is, one task at a time.
        job = _Job(db, ctx)
        out = []
        for ri, r in enumerate(ratios):
            if ctx.out_of_time():
                return out, True
            out += job.tune_tasks(workloads, r, position=(0, 1, ri, len(ratios)))
        for w in workloads if ctx.runner.real else []:
            fill_matrix(job, w)
        return out, False

    if ctx.opt.scheduler == "gradient":
        done = [tune_tasks()]
    elif lanes > 1:
        done = in_threads(tune_workload, len(workloads), lanes, db.path)
    else:
        done = []
        for wi in range(len(workloads)):
            done.append(tune_workload(wi, db))
            if done[-1][1]:
                break
    return [res for out, _ in done for res in out], any(s for _, s in done)


def _complete(job: "_Job", results: list[ShareResult]) -> None:
    """What a share's result needs every share tuned for: the whole-device config's time there,
    where its best came from, and its best after the winners matrix."""
    origins: dict[str, dict] = {}
    for res in results:
        res.whole_device_config_s = job.whole_device_time(res.workload_key, res.ratio)
        if res.workload_key not in origins:
            origins[res.workload_key] = winner_origins(job.db.measurements(
                workload_key=res.workload_key, device_id=job.device.id, partition=job.partition.kind))
        o = origins[res.workload_key].get(job.condition(res.ratio))
        res.origin = o.label() if o else ""
        # the winners matrix ran after the share's result was taken: its best may be newer
        best = job.db.best(**job.key(res.workload_key, job.condition(res.ratio)))
        res.best_s = best[0].median_s if best else res.best_s


class _Job:
    """The steps of a tune call on one database connection (one per thread)."""

    def __init__(self, db: TuningDatabase, ctx: Context):
        self.db, self.ctx = db, ctx
        self.device, self.partition, self.opt = ctx.device, ctx.partition, ctx.opt
        self.builder, self.runner, self.stage = ctx.builder, ctx.runner, ctx.stage
        self.models = ShareModels(db, ctx.device, ctx.partition.kind, ctx.opt, ctx.stage)
        self._signatures: list | None = None  # of a model's tasks, for their siblings

    def out_of_time(self) -> bool:
        return self.ctx.out_of_time()

    def condition(self, r: float) -> Condition:
        """The job's condition at key ratio ``r``: its partition, next to its neighbour."""
        return Condition(self.partition.kind, r, self.opt.interference)

    def key(self, workload_key: str, cond: Condition) -> dict:
        """A tuning key's columns, as the database takes them: the workload, this device, ``cond``."""
        return dict(workload_key=workload_key, device_id=self.device.id, **cond.to_dict())

    def count(self, key: dict) -> int:
        """The key's trials: recorded, and handed to a deferred runner in this call."""
        return self.db.count_measurements(**key) + len(self.ctx.pending_at(key))

    # -- one share ---------------------------------------------------------------------------

    def tune_share(self, w: Workload, r: float, position: tuple, first: bool = False) -> ShareResult:
        """``first``: the workload's first share in this call (its uniform samples go there)."""
        share = self.partition.grant(r)
        key = self.key(w.key, self.condition(share.key_ratio))
        check_imported(self, w, share, key)
        if first:
            measure_samples(self, w, share, key)
        before = self.db.count_measurements(**key)
        if self.count(key) < self.opt.trials and not self.out_of_time():
            search = KeySearch(self, w, share, key, position=position)
            try:
                while not self.out_of_time():
                    want = self.opt.trials - self.count(key)  # other jobs may share the key
                    if want <= 0 or not search.step(want):
                        break
            finally:
                search.close()
            self._confirm(w, share, key)
        return self._share_result(w, share, key, before)

    def tune_tasks(self, ws: Sequence[Workload], r: float, position: tuple) -> list[ShareResult]:
        """The tasks of a model at one share, ``opt.trials`` trials across them, each batch to the
        task furthest below its due share of weight x time (:mod:`.scheduler`)."""
        share = self.partition.grant(r)
        keys = [self.key(w.key, self.condition(share.key_ratio)) for w in ws]
        for w, k in zip(ws, keys):
            check_imported(self, w, share, k)
        before = [self.db.count_measurements(**k) for k in keys]
        searches: dict[int, KeySearch] = {}
        floors = vendor_floors(self.db, self.device.id, self.partition.kind, share.key_ratio)
        states = [TaskState(w.name or w.key, w.weight, n, None, floor_s=floors.get(w.key)) for w, n in zip(ws, before)]
        first = first_round(len(ws), self.opt.trials, self.opt.batch)
        try:
            while not self.out_of_time():
                for st, k in zip(states, keys):  # other jobs may share the keys
                    st.spent = self.count(k)
                    best = self.db.best(**k)
                    st.best_s = best[0].median_s if best else None
                left = self.opt.trials - sum(st.spent for st in states)
                i = pick_task(states, min(self.opt.batch, left), first) if left > 0 else None
                if i is None:
                    break
                if i not in searches:
                    searches[i] = KeySearch(self, ws[i], share, keys[i], self._siblings(ws, keys, i),
                                            position=position, budget_keys=keys)
                want = min(left, first - states[i].spent) if states[i].spent < first else left
                if not searches[i].step(want):
                    states[i].done = True
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
        if not (self.runner.real and self.opt.confirm_top) or self.out_of_time():
            return
        t0 = time.perf_counter()
        if self.runner.deferred:
            # A confirmation needs its times now. A deferred round carries the key's fastest
            # kernels instead, measured again beside the new ones so that the run compares them
            # on the same machine (the first measurement of a kernel under a key stands).
            rows = sorted(self.db.measurements(**key, status="ok", with_features=True), key=lambda m: m.median_s)
            cands = [c for m in rows[: self.opt.confirm_top]
                     if (c := candidate_from_trace(w, m.trace, "best", m.features, m.mod_hash)) is not None]
            if cands:
                self.measure(Batch(w, share, key, cands, "best"))
        else:
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

    def measure(self, batch: Batch) -> list[MeasureResult]:
        """Build and measure ``batch`` under its key's share and neighbour, and run the after-batch
        steps on it: each result as it exists, then the whole batch (:mod:`.after_batch`)."""
        steps, w = self.ctx.after_batch, batch.workload
        t0 = time.perf_counter()
        batch.built = self.builder.build([BuildInput.of(c, w.key, w.fast_math) for c in batch.candidates],
                                         self.target(batch.share))
        self.stage.add("build", time.perf_counter() - t0)
        self.stage.count("built", len(batch.candidates))
        results: list = [None] * len(batch.candidates)

        def on_result(i: int, res: MeasureResult) -> None:
            results[i] = res
            for step in steps:
                step.result(self, batch, i, res)

        for i, b in enumerate(batch.built):
            if not b.ok:
                on_result(i, MeasureResult(status="build_error", error=b.error))
        ok = [i for i, b in enumerate(batch.built) if b.ok]
        t0 = time.perf_counter()
        self.runner.run(batch.share, batch.key["interference"],
                        [self._run_input(w, batch.candidates[i], batch.built[i]) for i in ok],
                        on_result=lambda j, res: on_result(ok[j], res))
        self.stage.add("run", time.perf_counter() - t0)
        self.stage.count("measured", len(ok))
        for step in steps:
            step(self, batch, results)
        return results

    def _run_input(self, w: Workload, c: Candidate, b) -> RunInput:
        about = None
        if self.runner.deferred:  # what the import needs to record the result when it comes back
            about = {"trace": c.trace, "source": c.source, "search_s": c.search_s, "build_s": b.build_s,
                     "features": None if c.features is None else [float(x) for x in c.features]}
        return RunInput(w.to_dict(), b.artifact, b.cubin, c.mod_hash, candidate=about)

    def target(self, share: Share) -> dict:
        return target_for(self.device, share.units)

    def whole_device_time(self, wkey: str, r: float) -> float | None:
        """Time, at share r, of the config that is best at 100% (None if either is missing)."""
        full = self.db.best(**self.key(wkey, self.condition(WHOLE)))
        if not full:
            return None
        for m in self.db.measurements(**self.key(wkey, self.condition(r)), status="ok"):
            if m.mod_hash == full[0].mod_hash:
                return m.median_s
        return None
