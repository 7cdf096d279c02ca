"""The tuning loop: for each workload and each share, search, build, measure, record, learn.

``tune()`` is the library entry point behind ``spatialtune tune``. Everything it learns goes to
the database as it happens (one transaction per measurement), and everything it starts from is
read back from there, so a job killed at any point and started again with the same arguments
continues where it stopped: the trials already measured count toward the budget and are never
proposed again.

Shares are tuned in descending order. Before searching a share, the best configs found for the
other shares of the workload are measured under it (``transfer``): that gives the report its
"whole-device config at this share" column and gives evolution good parents.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .builder import BuildInput, LocalBuilder, target_for
from .cost_model import CostModel, create_cost_model
from .database import Measurement, TuningDatabase, norm_ratio
from .device import DeviceInfo, detect_cpu, detect_cuda
from .errors import ConfigError
from .interference import check_interference
from .partition import Partition, Share, check_ratio, create_partition
from .runner import LocalRunner, Runner, RunInput, RunSettings
from .search import Candidate, EvolutionarySearch, default_candidate
from .spec import Workload

log = logging.getLogger(__name__)


@dataclass
class TuneOptions:
    trials: int = 32  # per (workload, share), counting transfers and earlier runs
    batch: int = 8
    time_budget_s: float | None = None  # whole job; checked between batches
    target: str = "cpu"  # cpu | cuda
    partition: str | Partition | None = None  # default: cpu for the CPU target, mps for cuda
    interference: str = "none"
    cost_model: str = "xgb"
    transfer_top: int = 2  # configs taken from each other share
    seed: int = 0
    baselines: bool = True
    artifact_dir: str | None = None
    build_workers: int | None = None
    run: RunSettings = field(default_factory=RunSettings)

    def validate(self) -> None:
        if not isinstance(self.trials, int) or self.trials < 1:
            raise ConfigError(f"--trials must be a positive integer, got {self.trials!r}")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ConfigError(f"--batch must be a positive integer, got {self.batch!r}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError(f"--time-budget must be positive, got {self.time_budget_s!r}")
        if self.target not in ("cpu", "cuda"):
            raise ConfigError(f"--target must be cpu or cuda, got {self.target!r}")
        check_interference(self.interference)
        create_cost_model(self.cost_model)


@dataclass
class ShareResult:
    workload_key: str
    workload_name: str
    ratio: float
    granted_units: int
    unit: str
    best_s: float | None
    n_trials: int
    new_trials: int
    whole_device_config_s: float | None  # the 100%-best config measured at this share
    default_s: float | None  # TVM's unscheduled kernel at this share
    numpy_s: float | None

    @property
    def regret(self) -> float | None:
        if self.best_s and self.whole_device_config_s:
            return self.whole_device_config_s / self.best_s
        return None


@dataclass
class TuneSummary:
    device: DeviceInfo
    partition: str
    interference: str
    results: list[ShareResult]
    elapsed_s: float
    timings: dict[str, float]  # seconds spent in search, build, run, train
    stopped_early: bool = False


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
    device = detect_cuda() if opt.target == "cuda" else detect_cpu()
    partition = create_partition(opt.partition or ("cpu" if opt.target == "cpu" else "mps"))
    if opt.target == "cpu" and partition.kind != "cpu":
        raise ConfigError(f"partition {partition.kind!r} needs --target cuda")
    target = target_for(opt.target, arch=device.arch or "sm_90")
    db.add_device(device)
    for w in workloads:
        db.add_workload(w)
    art = Path(opt.artifact_dir or (db.path.parent / "artifacts")) / device.id
    stage = _Stage()
    results: list[ShareResult] = []
    stopped = False
    deadline = None if opt.time_budget_s is None else t_start + opt.time_budget_s
    own_runner = runner is None
    if own_runner:
        runner = LocalRunner(partition, device_kind=opt.target, settings=opt.run)
    with partition, LocalBuilder(art, workers=opt.build_workers) as builder, \
            (runner if own_runner else contextlib.nullcontext(runner)):
        job = _Job(db, device, partition, opt, builder, runner, target, art, stage, progress, deadline)
        for wi, w in enumerate(workloads):
            for ri, r in enumerate(ratios):
                if job.out_of_time():
                    stopped = True
                    break
                res = job.tune_share(w, r, position=(wi, len(workloads), ri, len(ratios)))
                results.append(res)
        # The whole-device column needs every share tuned first.
        for res in results:
            res.whole_device_config_s = job.whole_device_time(res.workload_key, res.ratio)
    return TuneSummary(device=device, partition=partition.kind, interference=opt.interference, results=results,
                       elapsed_s=time.perf_counter() - t_start, timings=dict(stage.t) | stage.counts,
                       stopped_early=stopped)


class _Job:
    def __init__(self, db, device, partition, opt, builder, runner, target, art, stage, progress, deadline):
        self.db, self.device, self.partition, self.opt = db, device, partition, opt
        self.builder, self.runner, self.target, self.art = builder, runner, target, art
        self.stage, self.progress, self.deadline = stage, progress, deadline
        self.models: dict[float, CostModel] = {}
        self.train: dict[float, tuple[list, list, list]] = {}

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def key(self, w: Workload, r: float) -> dict:
        return dict(workload_key=w.key, device_id=self.device.id, partition=self.partition.kind, ratio=r,
                    interference=self.opt.interference)

    # -- cost model per share ----------------------------------------------------------------

    def model_for(self, r: float) -> CostModel:
        if r in self.models:
            return self.models[r]
        saved = self.db.load_cost_model(self.device.id, self.partition.kind, r, self.opt.interference)
        if saved and saved[0] == self.opt.cost_model:
            model = CostModel.from_json(saved[1])
        else:
            model = create_cost_model(self.opt.cost_model)
        rows = self.db.measurements(device_id=self.device.id, partition=self.partition.kind, ratio=r,
                                    interference=self.opt.interference, status="ok", with_features=True)
        rows = [m for m in rows if m.features is not None]
        self.train[r] = ([m.features for m in rows], [m.median_s for m in rows], [m.workload_key for m in rows])
        if rows and model.n_samples != len(rows):
            self._fit(r, model)
        self.models[r] = model
        return model

    def _fit(self, r: float, model: CostModel) -> None:
        feats, times, groups = self.train[r]
        if len(feats) < 2:
            return
        t0 = time.perf_counter()
        model.fit(np.stack(feats), times, groups)
        self.db.save_cost_model(self.device.id, self.partition.kind, r, self.opt.interference, model.kind,
                                model.to_json(), len(feats))
        self.stage.add("train", time.perf_counter() - t0)

    # -- one share ---------------------------------------------------------------------------

    def tune_share(self, w: Workload, r: float, position: tuple) -> ShareResult:
        share = self.partition.grant(r)
        key = self.key(w, r)
        done = self.db.measurements(**key)
        model = self.model_for(r)
        before = len(done)
        if len(done) < self.opt.trials and not self.out_of_time():
            self._search(w, r, share, key, done, model, position)
        if self.opt.baselines:
            self._baselines(w, share, key)
        best = self.db.best(**key)
        base = {b["kind"]: b["median_s"] for b in self.db.baselines(**key)}
        n = self.db.count_measurements(**key)
        return ShareResult(w.key, w.name, r, share.units, share.unit, best[0].median_s if best else None, n,
                           n - before, None, base.get("tvm-default"), base.get("numpy"))

    def _search(self, w, r, share, key, done, model, position) -> None:
        t0 = time.perf_counter()
        others = [m for m in self.db.measurements(workload_key=w.key, device_id=self.device.id,
                                                  partition=self.partition.kind, interference=self.opt.interference,
                                                  status="ok")
                  if norm_ratio(m.ratio) != r]
        others.sort(key=lambda m: m.median_s)
        transfer = []
        for other_r in sorted({norm_ratio(m.ratio) for m in others}, reverse=True):
            transfer += [m.trace for m in others if norm_ratio(m.ratio) == other_r][: self.opt.transfer_top]
        search = EvolutionarySearch(
            w, self.target, model, measured=[(m.trace, m.median_s) for m in done],
            seeds=[(m.trace, m.median_s) for m in others[:32]], batch=self.opt.batch,
            rand_state=(self.opt.seed * 7919 + len(done) * 31 + int(r * 100)) % (2**31 - 1),
            threads=max(1, share.total),
        )
        self.stage.add("setup", time.perf_counter() - t0)
        n_done = len(done)
        pending = search.transfer(transfer)
        try:
            while n_done < self.opt.trials and not self.out_of_time():
                want = self.opt.trials - n_done
                t0 = time.perf_counter()
                if pending:
                    cands, pending = pending[:want], pending[want:]
                else:
                    cands = search.ask(min(self.opt.batch, want))
                self.stage.add("search", time.perf_counter() - t0)
                if not cands:
                    log.info("%s @ %g%%: search space exhausted after %d trials", w.key, r, n_done)
                    break
                times = self._measure(w, share, key, cands)
                search.tell(cands, times)
                n_done += len(cands)
                self._learn(r, model, cands, times, w.key)
                self._report(w, r, share, key, n_done, position)
        finally:
            search.close()

    def _measure(self, w, share: Share, key: dict, cands: Sequence[Candidate]) -> list[float | None]:
        t0 = time.perf_counter()
        built = self.builder.build([BuildInput(c.mod_json, c.mod_hash) for c in cands], self.target)
        self.stage.add("build", time.perf_counter() - t0)
        self.stage.counts["built"] += len(cands)
        ok = [i for i, b in enumerate(built) if b.ok]
        t0 = time.perf_counter()
        measured = self.runner.run(share, self.opt.interference,
                                   [RunInput(w.to_dict(), built[i].artifact, built[i].cubin, cands[i].mod_hash)
                                    for i in ok])
        self.stage.add("run", time.perf_counter() - t0)
        self.stage.counts["measured"] += len(ok)
        by_idx = dict(zip(ok, measured))
        times: list[float | None] = []
        for i, (c, b) in enumerate(zip(cands, built)):
            res = by_idx.get(i)
            m = Measurement(**key, mod_hash=c.mod_hash, trace=c.trace, status="build_error", error=b.error,
                            features=c.features, source=c.source, search_s=c.search_s, build_s=b.build_s,
                            granted_units=share.units, granted_share=share.fraction)
            if res is not None:
                m.status, m.error, m.times, m.median_s = res.status, res.error, res.times, res.median_s
                m.rel_err, m.run_s = res.rel_err, res.run_s
                m.granted_units = res.granted_units or share.units
                m.neighbour_throughput, m.neighbour_unit = res.neighbour_throughput, res.neighbour_unit
            self.db.record(m)
            times.append(m.median_s if m.status == "ok" else None)
        return times

    def _learn(self, r, model, cands, times, wkey) -> None:
        feats, ts, groups = self.train[r]
        for c, t in zip(cands, times):
            if t is not None and c.features is not None:
                feats.append(c.features)
                ts.append(t)
                groups.append(wkey)
        self._fit(r, model)

    def _baselines(self, w: Workload, share: Share, key: dict) -> None:
        if not isinstance(self.runner, LocalRunner):  # a replayed run has no hardware to time
            return
        have = {b["kind"] for b in self.db.baselines(**key)}
        kinds = [k for k in ("tvm-default", "numpy") if k not in have and not (k == "numpy" and self.opt.target == "cuda")]
        if not kinds:
            return
        t0 = time.perf_counter()
        for kind in kinds:
            artifact = None
            if kind == "tvm-default":
                c = default_candidate(w)
                b = self.builder.build([BuildInput(c.mod_json, "default-" + c.mod_hash)], self.target)[0]
                if not b.ok:
                    log.warning("default schedule of %s did not build: %s", w.key, b.error)
                    continue
                artifact = b.artifact
            res = self.runner.measure_baseline(share, self.opt.interference, w.to_dict(), kind, artifact)
            if res.status == "ok":
                self.db.record_baseline(**key, kind=kind, median_s=res.median_s, granted_units=share.units)
            else:
                log.warning("%s baseline of %s at %g%%: %s %s", kind, w.key, key["ratio"], res.status, res.error)
        self.stage.add("baseline", time.perf_counter() - t0)

    def _report(self, w, r, share, key, n_done, position) -> None:
        if self.progress is None:
            return
        best = self.db.best(**key)
        self.progress({"workload": w.name or w.key, "key": w.key, "ratio": r, "share": share.describe(),
                       "trials": n_done, "budget": self.opt.trials, "best_s": best[0].median_s if best else None,
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


def default_db_path() -> Path:
    return Path(os.environ.get("SPATIALTUNE_DB", Path(__file__).resolve().parent.parent / "tuning_db" /
                               "spatialtune.sqlite"))
