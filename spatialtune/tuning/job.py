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
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

from ..device import DeviceInfo, detect_cpu, detect_cuda, target_for
from ..errors import ConfigError
from ..measure.builder import BuildInput, LocalBuilder
from ..measure.runner import LocalRunner, Runner, RunInput
from ..partitions import Partition, create_partition
from ..search.cost_model import CostModel, create_cost_model
from ..search.policy import KeyId, SharePolicy, TrainingSet, fit_share_model, missing_comparisons
from ..search.space import Candidate, candidate_from_trace
from ..store.database import Measurement, TuningDatabase
from ..store.paths import artifact_dir
from ..terms import Share, check_ratio, norm_ratio
from ..workloads.spec import Workload
from .baselines import measure_baselines
from .confirm import confirm_best
from .options import ShareResult, TuneOptions, TuneSummary

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict], None]


class _Stage:
    def __init__(self):
        self.t = {"setup": 0.0, "search": 0.0, "build": 0.0, "run": 0.0, "train": 0.0, "baseline": 0.0}
        self.counts = {"built": 0, "measured": 0}

    def add(self, k: str, dt: float) -> None:
        self.t[k] += dt


def tune(workloads: Sequence[Workload], ratios: Sequence[float], db: TuningDatabase,
         options: TuneOptions | None = None, *, progress: ProgressFn | None = None,
         runner: Runner | None = None) -> TuneSummary:
    """Tune every workload at every ratio into ``db``; see the module docstring.

    ``runner`` replaces the local measuring runner (e.g. a ReplayRunner); the caller owns it.
    """
    opt = options or TuneOptions()
    opt.validate()
    if not workloads:
        raise ConfigError("no workloads to tune")
    ratios = sorted({norm_ratio(check_ratio(r)) for r in ratios}, reverse=True)
    t_start = time.perf_counter()
    device = detect_cuda(arch=opt.arch) if opt.target == "cuda" else detect_cpu(opt.mcpu)
    partition = create_partition(opt.partition or ("cpu" if opt.target == "cpu" else "mps"))
    if opt.target == "cpu" and partition.kind != "cpu":
        raise ConfigError(f"partition {partition.kind!r} needs --target cuda")
    db.add_device(device)
    for w in workloads:
        db.add_workload(w)
    art = Path(opt.artifact_dir or artifact_dir(db.path)) / device.id
    stage = _Stage()
    results: list[ShareResult] = []
    stopped = False
    deadline = None if opt.time_budget_s is None else t_start + opt.time_budget_s
    own_runner = runner is None
    if own_runner:
        runner = LocalRunner(partition, device_kind=opt.target, settings=opt.run)
    with partition, LocalBuilder(art, workers=opt.build_workers) as builder, \
            (runner if own_runner else contextlib.nullcontext(runner)):
        job = _Job(db, device, partition, opt, builder, runner, stage, progress, deadline)
        for wi, w in enumerate(workloads):
            for ri, r in enumerate(ratios):
                if job.out_of_time():
                    stopped = True
                    break
                results.append(job.tune_share(w, r, position=(wi, len(workloads), ri, len(ratios))))
            if not stopped and runner.real:
                job.fill_comparisons(w)
        # The whole-device column needs every share tuned first.
        for res in results:
            res.whole_device_config_s = job.whole_device_time(res.workload_key, res.ratio)
    return TuneSummary(device=device, partition=partition.kind, interference=opt.interference, results=results,
                       elapsed_s=time.perf_counter() - t_start, timings=dict(stage.t) | stage.counts,
                       stopped_early=stopped)


class _Job:
    def __init__(self, db: TuningDatabase, device: DeviceInfo, partition: Partition, opt: TuneOptions,
                 builder: LocalBuilder, runner: Runner, stage: _Stage, progress, deadline):
        self.db, self.device, self.partition, self.opt = db, device, partition, opt
        self.builder, self.runner = builder, runner
        self.stage, self.progress, self.deadline = stage, progress, deadline
        self.models: dict[float, CostModel] = {}
        self._data: TrainingSet | None = None

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
            if saved and saved[0] == self.opt.cost_model:
                model = CostModel.from_json(saved[1])
            if model is None or model.n_samples != len(self.data()):
                model = create_cost_model(self.opt.cost_model, seed=self.opt.seed)
                self._fit(r, model)
            self.models[r] = model
        return self.models[r]

    def _fit(self, r: float, model: CostModel) -> None:
        t0 = time.perf_counter()
        if fit_share_model(model, self.data(), r, self.opt.policy().own_share_weight):
            self.db.save_cost_model(self.device.id, self.partition.kind, r, self.opt.interference, model.kind,
                                    model.to_json(), len(self.data()))
        self.stage.add("train", time.perf_counter() - t0)

    # -- one share ---------------------------------------------------------------------------

    def tune_share(self, w: Workload, r: float, position: tuple) -> ShareResult:
        share = self.partition.grant(r)
        kr = share.key_ratio
        key = self.key(w, kr)
        before = self.db.count_measurements(**key)
        if before < self.opt.trials and not self.out_of_time():
            self._search(w, kr, share, key, position)
            if self.runner.real and self.opt.confirm_top:
                t0 = time.perf_counter()
                confirm_best(self.db, self.builder, self.runner, w, share, key, self.target(share),
                             top=self.opt.confirm_top)
                self.stage.add("run", time.perf_counter() - t0)
        if self.opt.baselines and isinstance(self.runner, LocalRunner):  # others have no hardware here to time
            t0 = time.perf_counter()
            measure_baselines(self.db, self.builder, self.runner, w, share, key, target_for(self.device, share.units))
            self.stage.add("baseline", time.perf_counter() - t0)
        best = self.db.best(**key)
        base = {b["kind"]: b["median_s"] for b in self.db.baselines(**key)}
        n = self.db.count_measurements(**key)
        return ShareResult(w.key, w.name, kr, share.units, share.unit, best[0].median_s if best else None, n,
                           n - before, None, base.get("tvm-default"), base.get("numpy"))

    def _search(self, w: Workload, r: float, share: Share, key: dict, position) -> None:
        t0 = time.perf_counter()
        rows = self.db.measurements(workload_key=w.key, device_id=self.device.id, with_features=True)
        model = self.model_for(r)
        policy = SharePolicy(w, target_for(self.device, share.units), KeyId(self.partition.kind, r,
                                                                            self.opt.interference),
                             rows, model, share_units=(share.units, share.total), options=self.opt.policy(),
                             batch=self.opt.batch, seed=self.opt.seed)
        self.stage.add("setup", time.perf_counter() - t0)
        pending = policy.transfers()
        try:
            while not self.out_of_time():
                want = self.opt.trials - self.db.count_measurements(**key)  # other jobs may share the key
                if want <= 0:
                    break
                t0 = time.perf_counter()
                if pending:
                    cands, pending = pending[:want], pending[want:]
                else:
                    cands = policy.ask(min(self.opt.batch, want))
                self.stage.add("search", time.perf_counter() - t0)
                if not cands:
                    log.info("%s @ %g%%: search space exhausted", w.key, r)
                    break
                times = self._measure(w, share, key, cands)
                policy.tell(cands, times)
                self._learn(r, model, cands, times, w.key, share)
                self._report(w, r, share, key, position)
        finally:
            policy.close()

    def fill_comparisons(self, w: Workload) -> None:
        """Measure, under every condition of ``w`` measured on this partition, the configs the
        single- vs multi-tenant comparison needs there and does not have yet (the whole-device
        quiet best; the share's quiet best under a neighbour): whichever condition was tuned
        first, every cell ends up measured. These are reference measurements, beyond the budget."""
        rows = self.db.measurements(workload_key=w.key, device_id=self.device.id, partition=self.partition.kind,
                                    with_features=True)
        for k, configs in sorted(missing_comparisons(rows).items(), key=lambda kv: (-kv[0].ratio,
                                                                                    kv[0].interference)):
            share = self.partition.grant(k.ratio)
            if share.key_ratio != k.ratio:  # a key this partition cannot grant again exactly
                log.info("%s: cannot grant %g%% again exactly; comparison left unmeasured there", w.key, k.ratio)
                continue
            cands = [c for m in configs if (c := candidate_from_trace(w, m.trace, "comparison", m.features,
                                                                      m.mod_hash)) is not None]
            if cands:
                log.info("%s @ %g%% %s: measuring %d comparison configs", w.key, k.ratio, k.interference, len(cands))
                self._measure(w, share, self.key(w, k.ratio) | {"interference": k.interference}, cands)

    def _measure(self, w: Workload, share: Share, key: dict, cands: Sequence[Candidate]) -> list[float | None]:
        """Build and measure ``cands`` under ``key``'s neighbour; each result is recorded the
        moment it exists."""
        t0 = time.perf_counter()
        built = self.builder.build([BuildInput(c.mod_json, c.mod_hash) for c in cands], self.target(share))
        self.stage.add("build", time.perf_counter() - t0)
        self.stage.counts["built"] += len(cands)
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
        self.stage.counts["measured"] += len(ok)
        return times

    def target(self, share: Share) -> dict:
        return target_for(self.device, share.units)

    def _learn(self, r: float, model: CostModel, cands, times, wkey: str, share: Share) -> None:
        data = self.data()
        for c, t in zip(cands, times):
            if t is not None:
                data.add(c.features, t, wkey, r, share.units)
        self._fit(r, model)

    def _report(self, w: Workload, r: float, share: Share, key: dict, position) -> None:
        if self.progress is None:
            return
        best = self.db.best(**key)
        self.progress({"workload": w.name or w.key, "key": w.key, "ratio": r, "share": share.describe(),
                       "trials": self.db.count_measurements(**key), "budget": self.opt.trials,
                       "best_s": best[0].median_s if best else None, "flops": w.flops, "position": position})

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
