"""What follows every measured batch of ``tune``: one list of after-batch steps.

MetaSchedule ends each batch with its ``MeasureCallback``s (``AddToDatabase``,
``RemoveBuildArtifact``, ``UpdateCostModel``), each a small object the task scheduler calls in
turn; the search strategy hears the results separately. ``tune`` has the same shape: every batch
it hands to a runner, whichever runner that is (this machine's workers, measuring servers, a GPU
bundle that measures later) and whatever the batch is for (a key's search and its transfers, the
winners matrix, imported configs checked, uniform samples, winners carried into a bundle), goes
through the job's one build-and-measure step, which runs the same list of :class:`AfterBatch`
steps on it (``Context.after_batch``, made by :func:`default_after_batch`, plus what the caller
of ``tune`` adds). The policy hears the times afterwards, from the key's search.

A step sees each result the moment it exists (:meth:`AfterBatch.result`) and the whole batch
once it is measured (``__call__``). Recording needs the first: a row is written as its result
comes, so a job killed in the middle of a batch keeps what it measured. Steps are called in the
thread that tuned the batch's workload; with a runner that measures several workloads at once
(``parallel`` > 1) that is several threads, each with its own job and database connection.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

from ..measure.runner import MeasureResult
from ..search.space import Candidate
from ..store.database import Measurement
from ..terms import Share
from ..workloads.spec import Workload

# What a batch is for: a key's search (its transfers, siblings and the policy's own candidates),
# the winners matrix, imported configs checked, a workload's uniform samples, or a key's winners
# carried into a deferred round beside its new candidates.
PURPOSES = ("search", "matrix", "import", "uniform", "best")


@dataclass
class Batch:
    """One batch handed to the builder and the runner, the tuning key its rows go under, and what
    it is for. ``position`` and ``budget_keys`` belong to a key's search: where it stands in the
    job and which keys' trials count against the budget the progress line shows (the key alone,
    or every task of a model at this share)."""

    workload: Workload
    share: Share
    key: dict  # the tuning key's columns: workload_key, device_id, partition, ratio, interference
    candidates: Sequence[Candidate]
    purpose: str = "search"
    position: tuple | None = None  # (workload, workloads, share, shares); None: no progress line
    budget_keys: Sequence[dict] = ()  # empty: the batch's own key
    built: list = field(default_factory=list)  # the builder's result of each candidate, once built


def times_of(results: Sequence[MeasureResult]) -> list[float | None]:
    """Each result's time, None where the kernel has none (a failure, or pending)."""
    return [r.median_s if r.status == "ok" else None for r in results]


def row(batch: Batch, i: int, res: MeasureResult) -> Measurement:
    """Candidate ``i``'s database row for its result (a build failure never ran: no times)."""
    c, b, share = batch.candidates[i], batch.built[i], batch.share
    m = Measurement(**batch.key, mod_hash=c.mod_hash, trace=c.trace, status=res.status, error=res.error,
                    features=c.features, source=c.source, search_s=c.search_s, build_s=b.build_s,
                    granted_units=share.units, granted_share=share.fraction)
    if res.status != "build_error":
        m.times, m.median_s, m.rel_err, m.run_s = res.times, res.median_s, res.rel_err, res.run_s
        m.granted_units = res.granted_units or share.units
        m.granted_share = m.granted_units / share.total
        m.neighbour_throughput, m.neighbour_unit = res.neighbour_throughput, res.neighbour_unit
    return m


class AfterBatch(ABC):
    """One step after each measured batch. ``job`` is the tune call's steps on this thread: its
    database connection (``db``), cost models (``models``), context (``ctx``), options (``opt``)
    and ``count(key)``, the trials a key has spent."""

    def result(self, job, batch: Batch, i: int, res: MeasureResult) -> None:
        """Candidate ``i``'s result, the moment it exists (a build failure before anything runs).
        Most steps wait for the whole batch."""

    @abstractmethod
    def __call__(self, job, batch: Batch, results: Sequence[MeasureResult]) -> None:
        """The batch measured: one result per candidate, in order (``build_error`` for a kernel
        that did not build, ``pending`` for one a deferred runner measures later)."""


class Record(AfterBatch):
    """Every result is a row of the database the moment it exists (MetaSchedule's
    ``AddToDatabase``), failures included, so no kernel is proposed under its key again. A pending
    result is never a row: the context notes it, so that it counts toward the key's budget within
    this call and is not handed out again; ``bundle import`` records it once measured."""

    def result(self, job, batch: Batch, i: int, res: MeasureResult) -> None:
        if res.status == "pending":
            job.ctx.add_pending(batch.key, batch.candidates[i].mod_hash)
        else:
            job.db.record(row(batch, i, res))

    def __call__(self, job, batch: Batch, results: Sequence[MeasureResult]) -> None:
        pass  # each row was written as its result came


class Retrain(AfterBatch):
    """The share's cost model learns a search batch's times and is saved (``UpdateCostModel``),
    so the next batch of every key at the share is ranked by it. Only a search batch: the
    reference measurements (matrix, imports, samples) reach the model when a job next reads its
    training rows from the database. A batch with pending results has no times yet; the models
    learn them when ``bundle import`` records them (``tuning.models.retrain``)."""

    def __call__(self, job, batch: Batch, results: Sequence[MeasureResult]) -> None:
        if batch.purpose != "search" or any(r.status == "pending" for r in results):
            return
        r = batch.share.key_ratio
        job.models.learn(r, job.models.model_for(r), batch.candidates, times_of(results), batch.workload.key,
                         batch.share.units)


class ReportProgress(AfterBatch):
    """The progress line of a key's search (``tune(progress=...)``): trials spent against the
    budget (pending ones included) and the best time so far."""

    def __call__(self, job, batch: Batch, results: Sequence[MeasureResult]) -> None:
        if job.ctx.progress is None or batch.position is None:
            return
        w, share = batch.workload, batch.share
        best = job.db.best(**batch.key)
        job.ctx.progress({"workload": w.name or w.key, "key": w.key, "ratio": share.key_ratio,
                          "share": share.describe(), "trials": sum(job.count(k) for k in batch.budget_keys or
                                                                   [batch.key]),
                          "budget": job.opt.trials, "best_s": best[0].median_s if best else None, "flops": w.flops,
                          "position": batch.position})


def default_after_batch() -> list[AfterBatch]:
    """The steps every batch of every runner goes through, in order: its rows first, so that the
    model and the progress line see them."""
    return [Record(), Retrain(), ReportProgress()]
