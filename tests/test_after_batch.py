"""The steps after every measured batch are one list, run the same way for every runner: a step a
caller adds to ``tune`` sees every batch (a key's search, its transfers, the winners matrix),
after the batch's rows are recorded; a deferred runner's pending results reach the steps but are
never rows.

The builder and runner here are stand-ins (no compiler, no hardware: a kernel's time comes from
its hash), so what is checked is the loop's bookkeeping, in seconds."""

from __future__ import annotations

import pytest

from spatialtune.measure.builder import Builder, BuildResult
from spatialtune.measure.runner import MeasureResult, Runner
from spatialtune.store.database import TuningDatabase
from spatialtune.tuning import TuneOptions, tune
from spatialtune.tuning.after_batch import AfterBatch, default_after_batch

OPTS = dict(trials=8, batch=4, population=16, genetic_iters=1, baselines=False, confirm_top=0, search_threads=1,
            build_deadline=None, tile_seeds=0)


class NoCompiler(Builder):
    """Builds nothing; the very first kernel it is handed fails to build."""

    def __init__(self):
        self.calls = 0

    def build(self, inputs, target):
        self.calls += 1
        return [BuildResult(None, "stand-in build error") if self.calls == 1 and i == 0 else BuildResult("-")
                for i in range(len(inputs))]


class ByHash(Runner):
    """A kernel's time is a function of its hash: deterministic, no hardware."""

    def run(self, share, interference, inputs, on_result=None):
        out = []
        for i, item in enumerate(inputs):
            t = 1e-4 * (1 + int(item.mod_hash[:6], 16) / 16**6) * 100 / share.key_ratio
            out.append(MeasureResult(status="ok", times=[t], median_s=t, granted_units=share.units))
            if on_result is not None:
                on_result(i, out[-1])
        return out


class Later(ByHash):
    """A deferred runner: every result is pending (measured elsewhere, later)."""

    deferred = True

    def run(self, share, interference, inputs, on_result=None):
        out = []
        for i, _ in enumerate(inputs):
            out.append(MeasureResult(status="pending"))
            if on_result is not None:
                on_result(i, out[-1])
        return out


class Spy(AfterBatch):
    """Notes each result as it comes and each whole batch, and what the database held by then."""

    def __init__(self):
        self.batches, self.results = [], []

    def result(self, job, batch, i, res):
        self.results.append((batch.share.key_ratio, batch.candidates[i].mod_hash, res.status))

    def __call__(self, job, batch, results):
        rows = {m.mod_hash for m in job.db.measurements(**batch.key)}
        self.batches.append(dict(purpose=batch.purpose, ratio=batch.share.key_ratio,
                                 hashes=[c.mod_hash for c in batch.candidates], statuses=[r.status for r in results],
                                 recorded=[c.mod_hash in rows for c in batch.candidates]))


@pytest.fixture
def dense(demo_space):
    return demo_space.select(["dense_small"])


def test_the_default_steps_record_then_retrain_then_report():
    assert [type(s).__name__ for s in default_after_batch()] == ["Record", "Retrain", "ReportProgress"]


def test_an_added_step_sees_every_measured_batch_after_its_rows(tmp_path, dense):
    spy, events = Spy(), []
    with TuningDatabase(tmp_path / "db.sqlite") as db:
        s = tune(dense, [100, 50], db, TuneOptions(**OPTS), runner=ByHash(), builder=NoCompiler(),
                 after_batch=[spy], progress=events.append)
        rows = db.measurements()
        saved = db.load_cost_model(s.device.id, "cpu", 50.0, "none")
    seen = [(b["ratio"], h) for b in spy.batches for h in b["hashes"]]
    assert sorted(seen) == sorted((m.ratio, m.mod_hash) for m in rows)  # every row, each once
    assert sorted((r, h) for r, h, _ in spy.results) == sorted(seen)  # each result as it came
    assert all(all(b["recorded"]) for b in spy.batches)  # the step runs after the rows are written
    assert {b["purpose"] for b in spy.batches} == {"search", "matrix"}
    assert [m.status for m in rows].count("build_error") == 1 and spy.batches[0]["statuses"][0] == "build_error"
    # the trials of each share are its search batches (at 50 % the transfers first); the progress
    # line follows each of them, counting what the share spent so far
    search = [b for b in spy.batches if b["purpose"] == "search"]
    spent = {100.0: 0, 50.0: 0}
    for b in search:
        spent[b["ratio"]] += len(b["hashes"])
        b["spent"] = spent[b["ratio"]]
    assert spent == {100.0: 8, 50.0: 8}
    assert [(e["ratio"], e["trials"]) for e in events] == [(b["ratio"], b["spent"]) for b in search]
    # the share's model retrained after each search batch, on the rows the searches measured
    assert saved is not None and saved.n_samples == sum(m.status == "ok" and m.source != "matrix" for m in rows)


def test_a_pending_batch_reaches_the_steps_and_is_no_row(tmp_path, dense):
    spy = Spy()
    with TuningDatabase(tmp_path / "db.sqlite") as db:
        s = tune(dense, [100], db, TuneOptions(**OPTS), runner=Later(), builder=NoCompiler(), after_batch=[spy])
        rows = db.measurements()
    pending = [h for b in spy.batches for h, st in zip(b["hashes"], b["statuses"]) if st == "pending"]
    assert len(spy.batches) == 1 and spy.batches[0]["purpose"] == "search"  # the key stops: the next would wait
    assert len(pending) == 3 == s.pending
    # the kernel that did not build is a row (it never reaches the runner); the pending ones are not
    assert [(m.status, m.mod_hash) for m in rows] == [("build_error", spy.batches[0]["hashes"][0])]


def test_a_models_tasks_share_the_steps_and_the_progress_counts_every_task(tmp_path, demo_space):
    """The gradient scheduler's batches go through the same steps; its progress line counts the
    trials of every task at the share against the one budget."""
    spy, events = Spy(), []
    ws = demo_space.select(["dense_small", "bmm_small"])
    with TuningDatabase(tmp_path / "db.sqlite") as db:
        tune(ws, [100], db, TuneOptions(**OPTS | dict(scheduler="gradient")), runner=ByHash(), builder=NoCompiler(),
             after_batch=[spy], progress=events.append)
        rows = db.measurements()
    search = [b for b in spy.batches if b["purpose"] == "search"]
    assert len(search) == len(events) >= 2 and {e["key"] for e in events} == {w.key for w in ws}
    assert [e["trials"] for e in events] == [sum(len(b["hashes"]) for b in search[:i + 1]) for i in range(len(search))]
    assert events[-1]["trials"] == 8 == sum(m.source != "matrix" for m in rows)
