"""A share's model compiled with the kernel fastest out of cache (models.cold, ``model
--rerank-cold K``): each timed run follows an eviction, the pick is among the task's K fastest
distinct kernels at the share, and the model still matches ONNX Runtime."""
import json

import numpy as np

from spatialtune.measure import in_worker
from spatialtune.models.cold import ColdPicker
from spatialtune.models.e2e import ModelOptions, measure_model
from spatialtune.store.database import TuningDatabase
from spatialtune.store.records import Measurement
from spatialtune.tuning import TuneOptions, tune
from spatialtune.workloads.spec import load_space

from conftest import run_cli
from test_models import QUICK, dense_block


def test_every_cold_run_follows_an_eviction_of_twice_the_last_level_cache(monkeypatch):
    events = []
    monkeypatch.setattr(in_worker, "evict", lambda: events.append("evict"))
    times = in_worker.cold_times(lambda: events.append("run"), 4)
    assert len(times) == 4 and events == ["evict", "run"] * 4
    events.clear()  # a model task's activations are written back between the eviction and the run
    in_worker.cold_times(lambda: events.append("run"), 2, refill=lambda: events.append("refill"))
    assert events == ["evict", "refill", "run"] * 2
    assert in_worker._llc_bytes() >= 1 << 20


def _m(h, t, status="ok"):
    return Measurement("w", "d", "cpu", 100.0, "none", h, "", status, median_s=t)


def test_the_pick_is_the_fastest_out_of_cache_among_the_k_fastest_distinct_kernels(monkeypatch):
    cold = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.5}
    picker = ColdPicker.__new__(ColdPicker)  # no worker: the timing is replaced below
    picker.top, picker.say = 3, lambda s: None
    asked = []
    monkeypatch.setattr(ColdPicker, "_cold", lambda self, w, m, i: asked.append(m.mod_hash) or cold[m.mod_hash])
    rows = [_m("a", 1.0), _m("a", 1.1), _m("b", 1.2), _m("c", 1.3), _m("d", 1.4), _m("e", 0.1, "wrong_result")]
    task = type("Task", (), {"name": "t"})()
    m, facts = picker(task, rows)
    assert asked == ["a", "b", "c"]  # the three fastest kernels, each once; d is fourth, e is wrong
    assert m.mod_hash == "c" and facts == {"cold_s": 1.0, "rank": 3, "timed": 3}
    monkeypatch.setattr(ColdPicker, "_cold", lambda self, w, m, i: None)
    assert picker(task, rows) is None  # nothing timed: the caller keeps the tuner's pick


def test_a_model_compiled_with_its_out_of_cache_picks_runs_and_matches_onnx_runtime(tmp_path):
    dense_block(tmp_path / "m.onnx")
    run_cli("workloads", "--from-onnx", tmp_path / "m.onnx", "--shape", "x=4,16", "--out", tmp_path / "m.toml",
            check=True)
    ws = load_space(tmp_path / "m.toml").workloads
    with TuningDatabase(tmp_path / "c.sqlite") as db:
        tune(ws, [100], db, TuneOptions(trials=6, baselines=False, confirm_top=0, **QUICK))
        res = measure_model(tmp_path / "m.onnx", [100], db, shapes={"x": (4, 16)},
                            options=ModelOptions(rounds=1, min_repeat_ms=1, warmup_ms=1, rerank_cold=3))
    rows = {r.variant: r for r in res.rows}
    st = rows["share-tuned"]
    assert st.status == "ok" and st.rel_err < 1e-4, (st.status, st.error)
    facts = st.detail["tasks"].values()
    assert all(1 <= f["rank"] <= 3 and f["cold_s"] > 0 for f in facts), list(facts)
    assert all(f["origin"].startswith("out of cache") for f in facts)
    assert "rank" not in str(rows["whole-tuned"].detail)  # the 100 %-tuned compile is the tuner's picks
    assert np.isfinite(rows["onnxruntime"].latency_s)


def test_a_model_tuned_under_cold_compiles_from_those_records_and_none_does_not_see_them(tmp_path):
    """``cold`` keeps its rows apart (another condition of the key): ``model --interference cold``
    compiles them, and the default condition (none) finds nothing tuned."""
    dense_block(tmp_path / "m.onnx")
    run_cli("workloads", "--from-onnx", tmp_path / "m.onnx", "--shape", "x=4,16", "--out", tmp_path / "m.toml",
            check=True)
    ws = load_space(tmp_path / "m.toml").workloads
    db_path = tmp_path / "c.sqlite"
    with TuningDatabase(db_path) as db:
        tune(ws, [100], db, TuneOptions(trials=len(ws) + 1, baselines=False, confirm_top=0, interference="cold", **QUICK))
        rows = db.measurements(status="ok")
        assert rows and {m.interference for m in rows} == {"cold"}
    p = run_cli("model", tmp_path / "m.onnx", "--shape", "x=4,16", "--ratios", "100", "--rounds", "1",
                "--min-repeat-ms", "1", "--interference", "cold", "--json", "--db", db_path)
    assert p.returncode == 0, p.stderr
    rows = {r["variant"]: r for r in json.loads(p.stdout)}
    st = rows["share-tuned"]
    assert st["status"] == "ok" and st["rel_err"] < 1e-4 and st["tuned_tasks"] == st["n_tasks"] == len(ws)
    assert st["detail"]["records"] == "cold"  # the model ran alone: the condition is its kernels'
    p = run_cli("model", tmp_path / "m.onnx", "--shape", "x=4,16", "--ratios", "100", "--rounds", "1",
                "--min-repeat-ms", "1", "--json", "--db", db_path)
    assert p.returncode == 0, p.stderr
    assert {r["variant"]: r for r in json.loads(p.stdout)}["share-tuned"]["tuned_tasks"] == 0
    p = run_cli("model", tmp_path / "m.onnx", "--interference", "lukewarm", "--db", db_path)
    assert p.returncode == 2 and "unknown interference 'lukewarm'" in p.stderr and "Traceback" not in p.stderr
