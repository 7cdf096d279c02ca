"""A compiled model per share, for schedulers: a small MLP tuned at two shares with a few trials,
timed end to end (model_runs), exported with `spatialtune model export`, then picked by the cores
granted, run (its output against ONNX Runtime's) and asked for the smallest share meeting a
latency target."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from spatialtune.partitions import create_partition
from spatialtune.store.database import TuningDatabase
from spatialtune.store.model_runs import ModelRun, model_runs, record_model_run
from spatialtune.tuning import TuneOptions, tune
from spatialtune.workloads.spec import load_space

from conftest import ROOT, run_cli
from test_models import QUICK, dense_block

CORES = len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from spatialtune.models.e2e import ModelOptions, measure_model

    d = tmp_path_factory.mktemp("export")
    model = dense_block(d / "mlp.onnx")
    run_cli("workloads", "--from-onnx", model, "--shape", "x=4,16", "--out", d / "mlp.toml", check=True)
    tasks = load_space(d / "mlp.toml").workloads
    with TuningDatabase(d / "db.sqlite") as db:
        tune(tasks, [50, 100], db, TuneOptions(trials=2 * len(tasks), scheduler="gradient", baselines=False, **QUICK))
        measure_model(model, [50, 100], db, shapes={"x": (4, 16)},
                      options=ModelOptions(rounds=2, min_repeat_ms=5, warmup_ms=5))
    p = run_cli("model", "export", model, "--shape", "x=4,16", "--ratios", "25,50,100", "--out", d / "out", "--db",
                d / "db.sqlite", check=True)
    assert "manifest.json" in p.stdout
    return d


def _manifest(d):
    return json.loads((d / "out" / "manifest.json").read_text())


def test_the_manifest_has_one_variant_per_granted_core_count_with_its_provenance(exported):
    from spatialtune.device import detect_cpu

    m = _manifest(exported)
    part = create_partition("cpu")
    units = sorted({part.units_for(r) for r in (25, 50, 100)})
    assert [v["granted_units"] for v in m["variants"]] == units
    assert m["device"]["id"] == detect_cpu().id and m["partition"] == "cpu" and m["model"]["name"] == "mlp"
    assert sum(len(v["asked"]) for v in m["variants"]) == 3  # 25 % and 50 % may grant the same cores
    with TuningDatabase(exported / "db.sqlite", create=False) as db:
        runs = model_runs(db, model="mlp")
        for v in m["variants"]:
            assert v["threads"] == v["granted_units"] and (exported / "out" / v["file"]).is_file()
            assert v["n_tasks"] == len(v["tasks"]) == 2
            # the share's own configs, or the 100 % ones where those ran faster there (a tiny model's
            # timings are noisy enough for either)
            ratio = 100.0 if v["compiled"] == "whole-tuned" else v["ratio"]
            assert v["compiled"] in ("share-tuned", "whole-tuned") and ("why" in v) == (ratio != v["ratio"])
            for t in v["tasks"]:
                best = db.best(workload_key=t["workload_key"], device_id=m["device"]["id"], partition="cpu",
                               ratio=ratio)
                if v["ratio"] in (50.0, 100.0):  # tuned there: every task's best config went in
                    assert best and t["measurement_id"] == best[0].measurement_id
                    assert t["mod_hash"] == best[0].mod_hash and t["tuned_ratio"] == ratio
                else:
                    assert not best and t["measurement_id"] is None
            assert v["tuned_tasks"] == sum(t["measurement_id"] is not None for t in v["tasks"])
            timed = [r for r in runs if r.ratio == v["ratio"]]
            assert {x["variant"] for x in v["latencies"]} == {r.variant for r in timed}
            st = next((x for x in v["latencies"] if x["variant"] == "share-tuned"), None)
            if timed:  # the run timed the same configs that were exported
                assert st["same_configs"] is True and st["latency_s"] == next(
                    r.latency_s for r in timed if r.variant == "share-tuned")


_RUN = """
import json, sys, numpy as np, onnxruntime as ort
from spatialtune.lookup import ModelLookup
ml = ModelLookup(sys.argv[1], preload=True)
x = np.random.default_rng(7).uniform(-1, 1, (4, 16)).astype("float32")
ref = ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
import tvm
out = []
for units in map(int, sys.argv[3:]):
    a = ml.lookup(units=units)
    (y,) = ml.load(a).run([x])
    out.append({"units": units, "match": a.match, "file": a.variant.file, "threads": a.variant.threads,
                "pool": tvm.get_global_func("runtime.NumThreads")(), "err": float(np.abs(y - ref).max())})
print(json.dumps(out))
"""


def test_a_lookup_by_cores_runs_that_variant_with_its_threads_and_matches_onnx_runtime(exported):
    m = _manifest(exported)
    asked = [1, CORES, CORES + 1]
    p = subprocess.run([sys.executable, "-c", _RUN, str(exported / "out"), str(exported / "mlp.onnx"),
                        *map(str, asked)], capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr[-3000:]
    by_units = {v["granted_units"]: v for v in m["variants"]}
    for r in json.loads(p.stdout):
        want = by_units[max(u for u in by_units if u <= r["units"])]
        assert r["file"] == want["file"] and r["threads"] == r["pool"] == want["threads"], r
        assert r["match"] == ("exact" if r["units"] in by_units else "below")
        assert r["err"] < 1e-4, r


def test_the_share_rule_picks_exact_below_above_and_miss(exported, tmp_path):
    from spatialtune.lookup import ModelLookup

    ml = ModelLookup(exported / "out")
    ratios = [v.ratio for v in ml.variants]
    assert ml.lookup(ratio=ratios[0]).match == "exact"
    low = ml.lookup(ratio=ratios[0] / 2)
    assert (low.match, low.variant.ratio) == ("above", ratios[0]) and "oversubscribes" in low.reason
    high = ml.lookup(units=ml.variants[-1].granted_units + 3)
    assert (high.match, high.variant.ratio) == ("below", ratios[-1])
    assert ml.lookup(units=1) is ml.lookup(units=1)  # memoised
    shutil.copytree(exported / "out", tmp_path / "empty")
    m = _manifest(exported) | {"variants": []}
    (tmp_path / "empty" / "manifest.json").write_text(json.dumps(m))
    miss = ModelLookup(tmp_path / "empty").lookup(units=1)
    assert (miss.found, miss.match, miss.path) == (False, "miss", None) and miss.reason


def test_the_smallest_share_meeting_a_latency_target(exported, tmp_path):
    db_path = tmp_path / "db.sqlite"
    shutil.copy(exported / "db.sqlite", db_path)
    with TuningDatabase(db_path) as db:
        st = {r.ratio: r for r in model_runs(db, model="mlp") if r.variant == "share-tuned"}
        r100 = st[100.0]
        record_model_run(db, ModelRun(**{**r100.to_dict(), "id": None, "created_at": "", "run": "with-neighbour",
                                         "latency_s": 3 * r100.latency_s, "detail": {"interference": "memory"}}))
    slowest = max(r.latency_s for r in st.values())
    cases = [(slowest * 1e3 * 1.01, "none", min(st)),
             (min(r.latency_s for r in st.values()) * 1e3 * 0.5, "none", None),
             (3 * r100.latency_s * 1e3 * 1.01, "memory", 100.0),
             (r100.latency_s * 1e3 * 1.01, "memory", None)]
    for ms, neighbour, want in cases:
        p = run_cli("lookup", "--model", "mlp", "--latency-ms", str(ms), "--interference", neighbour, "--db", db_path,
                    check=True)
        out = json.loads(p.stdout)
        assert out["found"] == (want is not None) and out["ratio"] == want, out
        if want is None:
            assert out["reason"].startswith("no share meets")
    p = run_cli("lookup", "--model", "mlp", "--latency-ms", "1000", "--interference", "compute", "--db", db_path,
                check=True)
    assert "measured under: memory, none" in json.loads(p.stdout)["reason"]


def test_a_latency_answer_is_of_the_compile_the_share_ships():
    """From the database as from an export: a share whose run timed the 100 %-tuned compile more
    than 3 % faster answers with that compile's latency and says so; within the noise, or from
    another run, the share's own."""
    from spatialtune.lookup.model_latency import shipped, smallest_share

    def row(run, ratio, variant, ms, status="ok"):
        return {"run": run, "ratio": ratio, "granted_units": int(ratio // 50), "variant": variant,
                "latency_s": ms / 1e3, "status": status, "interference": "none"}

    rows = [row("a", 50.0, "share-tuned", 20.0), row("a", 50.0, "whole-tuned", 18.0),
            row("a", 100.0, "share-tuned", 10.0), row("a", 100.0, "whole-tuned", 9.8)]
    ans = smallest_share("m", shipped(rows), 19.0)
    assert (ans.found, ans.ratio, ans.latency_s, ans.compiled) == (True, 50.0, 0.018, "whole-tuned")
    assert [m["compiled"] for m in ans.measured] == ["whole-tuned", "share-tuned"]
    # a newer run at 50 % where the two were within the noise: the share's own, 19.9 ms
    rows += [row("b", 50.0, "share-tuned", 19.9), row("b", 50.0, "whole-tuned", 19.5)]
    ans = smallest_share("m", shipped(rows), 19.0)
    assert (ans.ratio, ans.compiled) == (100.0, "share-tuned")
    # a failed 100 %-tuned compile, or one from another run, is never substituted
    assert shipped([row("c", 50.0, "share-tuned", 20.0), row("c", 50.0, "whole-tuned", 5.0, "error")])[0]["variant"] \
        == "share-tuned"
    assert shipped([row("c", 50.0, "share-tuned", 20.0), row("d", 50.0, "whole-tuned", 5.0)])[0]["latency_s"] == 0.02


@pytest.mark.parametrize("spoil, args, message", [
    (lambda d: (d / "manifest.json").write_text("{not json"), ["--units", "1"], "not a model manifest"),
    (lambda d: (d / "manifest.json").write_text(json.dumps({**json.loads((d / "manifest.json").read_text()),
                                                            "variants": [{"ratio": 50}]})),
     ["--units", "1"], "malformed manifest"),
    (lambda d: [p.unlink() for p in d.glob("*.so")][:0], ["--units", "1"], "which is missing"),
    (lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text().replace('"id": "cpu-',
                                                                                           '"id": "cpu-0')),
     ["--units", "1"], "compiled for device cpu-0"),
    (None, ["--latency-ms", "5"], "no model 'nosuch'"),
    (None, ["--latency-ms", "-1"], "positive number of milliseconds"),
])
def test_bad_export_input_is_one_line_and_exit_2(exported, tmp_path, spoil, args, message):
    if spoil is None:
        p = run_cli("lookup", "--model", "nosuch" if "5" in args else "mlp", *args, "--db", exported / "db.sqlite")
    else:
        shutil.copytree(exported / "out", tmp_path / "out")
        spoil(tmp_path / "out")
        p = run_cli("lookup", "--model", tmp_path / "out", *args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_another_device_is_accepted_when_asked_and_export_needs_a_model(exported, tmp_path):
    shutil.copytree(exported / "out", tmp_path / "out")
    man = tmp_path / "out" / "manifest.json"
    man.write_text(man.read_text().replace('"id": "cpu-', '"id": "cpu-0'))
    p = run_cli("lookup", "--model", tmp_path / "out", "--units", "1", "--any-device", check=True)
    assert json.loads(p.stdout)["match"] == "exact"
    p = run_cli("model", "export", tmp_path / "missing.onnx", "--ratios", "50", "--out", tmp_path / "x", "--db",
                exported / "db.sqlite")
    assert p.returncode == 2 and "no such ONNX file" in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("slower, ships", [(2.0, "whole-tuned"), (1.01, "share-tuned")])
def test_a_share_ships_the_100pct_tuned_compile_only_where_that_ran_faster_beyond_the_noise(
        exported, tmp_path, slower, ships):
    from spatialtune.lookup import ModelLookup

    db_path = tmp_path / "db.sqlite"
    shutil.copy(exported / "db.sqlite", db_path)
    small = create_partition("cpu").grant(50).key_ratio
    with TuningDatabase(db_path) as db:  # the newest run at the share again, share-tuned `slower` x the 100%-tuned
        rows = [r for r in model_runs(db, model="mlp") if r.ratio == small]
        last = [r for r in rows if r.run == rows[-1].run]
        whole = next(r for r in last if r.variant == "whole-tuned")
        for r in last:
            lat = slower * whole.latency_s if r.variant == "share-tuned" else r.latency_s
            record_model_run(db, ModelRun(**{**r.to_dict(), "id": None, "created_at": "", "run": "again",
                                             "latency_s": lat}))
    out = tmp_path / "out"
    p = run_cli("model", "export", exported / "mlp.onnx", "--shape", "x=4,16", "--ratios", "50,100", "--out", out,
                "--db", db_path, check=True)
    v = next(v for v in json.loads((out / "manifest.json").read_text())["variants"] if v["ratio"] == small)
    assert v["compiled"] == ships and ("ships the 100%-tuned compile" in p.stderr) == (ships == "whole-tuned")
    want = 100.0 if ships == "whole-tuned" else small
    assert all(t["tuned_ratio"] == want for t in v["tasks"] if t["measurement_id"] is not None), v["tasks"]
    # a latency target between the two: met at this share only by the compile it ships
    between = whole.latency_s * 1e3 * (1 + slower) / 2
    ans = ModelLookup(out).share_for_latency(between)
    assert (ans.found and ans.ratio == small) == (ships == "whole-tuned") or small == 100.0, ans
