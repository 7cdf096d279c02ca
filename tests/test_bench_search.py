"""scripts/bench_search.py compares searches on what each knew at the time and on equal terms:
a pick at a budget reads only the trials measured by then, with their first measurements; a
tune_tir at a later share really starts from its earlier shares' records."""
import json
import sys

import pytest

from conftest import ROOT
from dbutil import DENSE, meas, populate

sys.path.insert(0, str(ROOT / "scripts"))


def test_a_pick_at_a_budget_ignores_a_later_confirmation(tmp_path):
    """Kernel a was the fastest of the first two trials; a confirmation after the search (more
    repeats, slower) makes b the database's best. The pick at 2 trials is still a."""
    from bench_search_methods import rows_from_db
    from bench_search_stats import best_after

    from spatialtune.store.database import TuningDatabase

    with TuningDatabase(tmp_path / "t.sqlite") as db:
        populate(db)
        a, b = meas(h="a", t=1e-3), meas(h="b", t=1.2e-3)
        db.record(a)
        db.record(b)
        db.add_times(a, [1.5e-3] * 5)  # the confirmation, after trial 2
        assert db.best()[0].mod_hash == "b"  # what picking from the medians would say
        rows = rows_from_db(db, DENSE.key, 100.0, repeat=3, t0=0.0)
    assert [r["t"] for r in rows] == [1e-3, 1.2e-3]
    assert best_after(rows, 2)["trace"] == "trace-a"
    assert best_after(rows, 1)["trace"] == "trace-a"


def test_a_pick_at_a_budget_ignores_later_trials():
    from bench_search_stats import best_after, best_by_wall, reach, trials_to_95

    rows = [{"trace": "x", "t": 3.0, "at_s": 1.0}, {"trace": "y", "t": None, "at_s": 2.0},
            {"trace": "z", "t": 2.0, "at_s": 5.0}, {"trace": "w", "t": 1.0, "at_s": 9.0}]
    assert best_after(rows, 2)["trace"] == "x" and best_after(rows, 3)["trace"] == "z"
    assert best_by_wall(rows, 4.9)["trace"] == "x" and best_by_wall(rows, 9.0)["trace"] == "w"
    assert best_after(rows, 0) is None and best_by_wall(rows, 0.5) is None
    assert reach(rows, 2.0) == (3, 5.0) and reach(rows, 0.5) is None
    assert trials_to_95(rows) == 4


def test_the_whole_job_sums_every_share_and_misses_when_one_share_does():
    from bench_search_stats import job_cost

    first = {"ratio": 100, "reach": {"spatialtune": [10, 20.0], "tune_tir": [30, 40.0]}}
    later = {"ratio": 50, "reach": {"spatialtune": [2, 3.0], "tune_tir": [5, 6.0], "tune_tir-scratch": None}}
    assert job_cost([first, later]) == {"spatialtune": (12, 23.0), "tune_tir per share": None,
                                        "tune_tir warm": (35, 46.0)}


def test_vs_vendor_takes_the_faster_anchor_within_each_round():
    from bench_search_stats import vs_vendor

    d = {"numpy_rounds": [2.0, 3.0, 2.0], "ort_rounds": [1.0, None, 4.0]}
    # per round the faster anchor (1.0, 3.0, 2.0) over the pick (2.0, 3.0, 2.0): 0.5, 1.0, 1.0
    assert vs_vendor(d, {"t": 2.0, "rounds": [2.0, 3.0, 2.0]}) == pytest.approx(1.0)
    assert vs_vendor({"numpy_s": 2.0}, {"t": 2.5}) == pytest.approx(0.8)  # a pass recorded before the rounds


def test_the_onnx_anchor_computes_what_the_workload_does(tmp_path):
    """The one-node models against the float64 reference, for each matmul form."""
    import numpy as np
    import onnxruntime as ort
    from bench_search_methods import onnx_model

    from spatialtune.workloads.check import check_output
    from spatialtune.workloads.spec import Workload

    for w in (DENSE, Workload(op="batch_matmul", dtype="fp32", params={"B": 2, "M": 4, "N": 8, "K": 16,
                                                                        "transpose_b": 1}, name="qk")):
        xs = w.operator.random_inputs(w.params, w.dtype, np.random.default_rng(1))
        sess = ort.InferenceSession(str(onnx_model(w, tmp_path / f"{w.name}.onnx")), providers=["CPUExecutionProvider"])
        (out,) = sess.run(None, dict(zip("AB", xs)))
        assert check_output(out, w.operator.reference(w.params, xs), w.dtype)[1] is None


def test_a_warm_tune_tir_starts_from_the_earlier_share_records(tmp_path):
    """tune_tir at 50 % given the 100 % run's database: the records are there before it starts,
    and MetaSchedule's evolutionary search picks them for its first population (its own log says
    so); from scratch it picks none."""
    from bench_search_methods import run_tune_tir

    from spatialtune.measure.runner import RunSettings
    from spatialtune.partitions.cpu import CpuPartition
    from spatialtune.workloads.spec import Workload

    w = Workload(op="dense", dtype="fp32", params={"M": 16, "N": 16, "K": 16}, name="tiny")
    part = CpuPartition()
    run = RunSettings(repeat=2, min_repeat_ms=1, warmup_ms=1, timeout=60)
    first = run_tune_tir(w, part.grant(100), 2, 0, tmp_path / "a", run)
    assert first["warm_records"] == 0 and first["picked_from_db"][:1] == [0]
    assert any(r["t"] is not None for r in first["rows"])  # measured through spatialtune's runner
    warm = run_tune_tir(w, part.grant(50), 2, 0, tmp_path / "b", run, warm_from=tmp_path / "a")
    n = len([r for r in first["rows"] if r["t"] is not None])
    assert warm["warm_records"] == len(first["rows"])
    assert warm["warm_traces"] == [r["trace"] for r in first["rows"]]
    assert warm["picked_from_db"][0] == n  # every measured record of the first share seeds it
    records = (tmp_path / "b" / "database_tuning_record.json").read_text().splitlines()
    assert len(records) == len(first["rows"]) + len(warm["rows"])
    assert [json.loads(x) for x in records[:len(first["rows"])]] == \
        [json.loads(x) for x in (tmp_path / "a" / "database_tuning_record.json").read_text().splitlines()]
    # a run in the same directory (a benchmark resumed after a stop) starts empty again: the
    # records a stopped run left there would be a warm start nobody asked for
    again = run_tune_tir(w, part.grant(100), 2, 0, tmp_path / "a", run)
    assert again["warm_records"] == 0 and again["picked_from_db"][:1] == [0]
    assert len((tmp_path / "a" / "database_tuning_record.json").read_text().splitlines()) == len(again["rows"])
