"""GPU rounds through bundles, for real on this host: a round is ``tune`` with the bundle runner.

Round 1: ``tune`` with a :class:`BundleRunner` for this host's cores (``target cpu``: the same
loop, policy, builder, manifest, runner and import as a GPU bundle, measurable without a GPU):
it records nothing and packs one search batch for the whole host. ``bundle run`` measures it
under two shares of the cores with ``--top 2`` (so the 100% pool is larger than the 50% one);
``bundle import`` records it (and retrains the per-share cost models). Round 2: ``bundle build
--db``, the same ``tune`` again from that database, proposes new candidates per share, the
transfers, each share's winners and the winners matrix. Every time in the database was measured
here; nothing is made up. The device-selection errors use device rows only.
"""

import json
import shutil

import pytest

from conftest import run_cli
from spatialtune.bundle.importer import import_results
from spatialtune.bundle.manifest import load_manifest
from spatialtune.bundle.pack import BundleRunner
from spatialtune.bundle.run import RunOptions, run_bundle
from spatialtune.device import DeviceInfo, detect_cpu
from spatialtune.measure.runner import RunSettings
from spatialtune.store.database import TuningDatabase
from spatialtune.terms import norm_ratio, parse_condition
from spatialtune.tuning import TuneOptions, tune
from spatialtune.workloads.spec import load_space

SPACE = """
[space]
name = "rounds-tiny"

[[workload]]
name = "mm_tiny"
op = "matmul"
dtype = "fp32"
shape = { M = 64, N = 64, K = 64 }
"""

CONDS = ["cpu:100", "cpu:50"]
RUN = dict(repeat=2, min_repeat_ms=1, timeout=60.0)
NEW = ("search", "explore", "local", "seed-tile")  # what the policy's search proposes
WK = "matmul_fp32_M64_N64_K64"


def _round1_options():
    return TuneOptions(trials=1000, batch=5, baselines=False, build_workers=2, search_threads=1)


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
    d = tmp_path_factory.mktemp("rounds")
    (d / "space.toml").write_text(SPACE)
    ws = load_space(str(d / "space.toml")).select([])
    db_path = d / "db.sqlite"
    with TuningDatabase(db_path, create=True) as db:
        with BundleRunner(d / "r1", detect_cpu(), "cpu", space=str(d / "space.toml")) as runner:
            s1 = tune(ws, [100], db, _round1_options(), runner=runner)
        recorded1 = db.count_measurements()
    m1 = load_manifest(str(d / "r1"))
    res1 = run_bundle(str(d / "r1"), str(d / "res1"), [parse_condition(c) for c in CONDS], RunOptions(top=2, **RUN))
    imp1 = run_cli("bundle", "import", d / "res1", "--db", db_path, timeout=300)
    assert imp1.returncode == 0, imp1.stderr
    with TuningDatabase(db_path) as db:
        before = {(m.partition, norm_ratio(m.ratio), m.mod_hash): m for m in db.measurements()}
    shutil.copy(db_path, d / "local.sqlite")  # for tune here, from the same measurements
    r = run_cli("-v", "bundle", "build", "--space", d / "space.toml", "--target", "cpu", "--candidates", "4",
                "--transfer-top", "3", "--explore", "mm_tiny=2", "--db", db_path, "--out", d / "r2", timeout=600)
    assert r.returncode == 0, r.stderr
    m2 = load_manifest(str(d / "r2"))
    return dict(d=d, ws=ws, s1=s1, recorded1=recorded1, m1=m1, res1=res1, imp1=imp1, db_path=db_path, before=before,
                cli=r, m2=m2)


def test_round1_is_tune_with_a_deferred_runner(rounds):
    """tune packed its first batch and recorded nothing: a pending kernel is neither a time nor a failure."""
    s1, m1 = rounds["s1"], rounds["m1"]
    assert rounds["recorded1"] == 0 and s1.pending == 5
    assert [(r.ratio, r.n_trials, r.new_trials, r.best_s) for r in s1.results] == [(100.0, 0, 0, None)]
    assert len(m1["candidates"]) == 5 and m1["target"]["kind"] == "llvm"
    assert all(c["source"] in NEW and c["for"] == [["cpu", 100.0, "none"]] and c["status"] == "ok"
               for c in m1["candidates"])
    assert all(c["trace"] and len(c["features"]) > 10 for c in m1["candidates"])


def test_the_same_tune_call_goes_on_from_the_import(rounds):
    """Round 1's own call made again after the import: tune continues from the database, as after
    a kill: a new batch none of which was measured, and the share's winners carried beside it."""
    d, before = rounds["d"], rounds["before"]
    with TuningDatabase(rounds["db_path"]) as db, \
            BundleRunner(d / "r1again", detect_cpu(), "cpu", space=str(d / "space.toml")) as runner:
        s = tune(rounds["ws"], [100], db, _round1_options(), runner=runner)
        assert db.count_measurements() == len(before)
    m = load_manifest(str(d / "r1again"))
    new = [c for c in m["candidates"] if c["source"] in NEW]
    assert len(new) == 5 and not {c["mod_hash"] for c in new} & {h for (_, _, h) in before}
    assert {c["source"] for c in m["candidates"]} - set(NEW) <= {"best", "transfer", "matrix"}
    assert any(c["source"] == "best" for c in m["candidates"])
    assert s.pending >= 5 and s.results[0].n_trials == sum(r == 100.0 for (_, r, _) in before)


def test_a_pending_result_is_never_a_row(tmp_path):
    from spatialtune.errors import DatabaseError
    from spatialtune.store.database import Measurement

    with TuningDatabase(tmp_path / "db.sqlite") as db, pytest.raises(DatabaseError, match="pending"):
        db.record(Measurement(workload_key=WK, device_id="cpu-x", partition="cpu", ratio=100.0,
                              interference="none", mod_hash="h", trace="t", status="pending"))


def test_round1_measured_for_real(rounds):
    res1, imp1 = rounds["res1"], rounds["imp1"]
    ok100 = [m for m in res1["measurements"] if m["condition"] == "cpu:100%" and m["status"] == "ok"]
    ok50 = [m for m in res1["measurements"] if m["condition"] == "cpu:50%" and m["status"] == "ok"]
    assert len(ok100) >= 4 and len(ok50) == 2  # --top 2 after the whole host
    assert all(m["median_s"] > 0 and m["rel_err"] < 1e-3 for m in ok100 + ok50)
    assert f"imported {len(res1['measurements'])} measurements" in imp1.stdout
    assert "retrained 2 cost models" in imp1.stdout
    assert res1["device"]["kind"] == "cpu"


def test_round2_proposes_nothing_already_measured(rounds):
    before, m2 = rounds["before"], rounds["m2"]
    measured = {h for (_, _, h) in before}
    # --candidates 4 per share (the policy's own uniform picks are for a share too), --explore 2 per workload
    new = [c for c in m2["candidates"] if c["source"] in NEW]
    uniform = [c for c in m2["candidates"] if c["source"] == "uniform"]
    assert sorted(sum((c["shares"] for c in new), [])) == ["cpu:100%"] * 4 + ["cpu:50%"] * 4
    assert len(uniform) == 2 and all(c["for"] == [["cpu", 100.0, "none"]] for c in uniform)
    assert not {c["mod_hash"] for c in new + uniform} & measured
    assert all(len(c["features"]) > 10 for c in new + uniform)
    assert len({c["mod_hash"] for c in m2["candidates"]}) == len(m2["candidates"])
    assert all(c["status"] == "ok" for c in m2["candidates"])
    with TuningDatabase(rounds["db_path"], create=False) as db:
        (dev,) = db.devices()
        # each share's search ranked with the model the import saved for it, trained on both
        # shares' rows: tune reused it (nothing was measured since), so it is still there as saved
        n_ok = sum(m.status == "ok" for m in before.values())
        for ratio in (100.0, 50.0):
            saved = db.load_cost_model(dev["id"], "cpu", ratio, "none")
            assert saved.kind == "xgb" and saved.n_samples == n_ok
        assert db.count_measurements() == len(before)  # the round recorded nothing
    assert m2["round"]["device_id"] == dev["id"]
    assert f"{len(new)} new" in rounds["cli"].stdout


def test_round2_measures_each_share_winners_at_every_share(rounds):
    before, m2 = rounds["before"], rounds["m2"]

    def best(ratio, k=3):
        ok = sorted((m for (p, r, _), m in before.items() if r == ratio and m.status == "ok"),
                    key=lambda m: m.median_s)
        return [m.mod_hash for m in ok[:k]]

    at = {r: {h for (_, rr, h) in before if rr == r} for r in (100.0, 50.0)}
    # what round 2 must carry, from the database alone
    want_transfer = {h: "cpu:50%" for h in best(100.0) if h not in at[50.0]}
    want_transfer |= {h: "cpu:100%" for h in best(50.0) if h not in at[100.0]}
    assert want_transfer, "round 1 left no winner unmeasured at another share"
    got = {c["mod_hash"]: c for c in m2["candidates"] if c["source"] == "transfer"}
    assert set(got) == set(want_transfer)
    assert all(want_transfer[h] in got[h]["shares"] for h in got)
    anchors = {c["mod_hash"] for c in m2["candidates"] if c["source"] == "best"}
    assert anchors == (set(best(100.0)) | set(best(50.0))) - set(want_transfer)


def test_a_round_proposes_what_tune_proposes_here(rounds):
    """From the same database, tune measuring here takes the same kinds of candidates the
    round packed: the transfers first, then batches of the policy's search."""
    with TuningDatabase(rounds["d"] / "local.sqlite") as db:
        known = {(m.key, m.mod_hash) for m in db.measurements()}
        tune(rounds["ws"], [100, 50], db, TuneOptions(trials=9, batch=4, baselines=False, build_workers=2,
                                                       confirm_top=0, transfer_top=3, search_threads=1,
                                                       run=RunSettings(repeat=2, min_repeat_ms=1)))
        local = {m.source for m in db.measurements() if (m.key, m.mod_hash) not in known}
    packed = {c["source"] for c in rounds["m2"]["candidates"]} - {"best", "uniform"}
    assert "transfer" in local and "transfer" in packed
    assert local & set(NEW) and packed & set(NEW)
    assert local <= set(NEW) | {"transfer", "matrix"} and packed <= set(NEW) | {"transfer", "matrix"}


def test_round2_runs_and_imports(rounds):
    """Round 2 through the same run and import: the transfers get their missing share, the
    winners are re-measured (the first measurement stands), the new candidates are added."""
    d, m2, before = rounds["d"], rounds["m2"], rounds["before"]
    res2 = run_bundle(str(d / "r2"), str(d / "res2"), [parse_condition(c) for c in CONDS], RunOptions(top=1, **RUN))
    ids50 = {m["candidate"] for m in res2["measurements"] if m["condition"] == "cpu:50%"}
    carried = {c["id"] for c in m2["candidates"] if c["source"] in ("transfer", "best")}
    assert carried <= ids50  # kept past --top 1
    with TuningDatabase(rounds["db_path"], create=False) as db:
        s = import_results(str(d / "res2"), db)
        after = {(m.partition, norm_ratio(m.ratio), m.mod_hash) for m in db.measurements()}
    again = sum((m["partition"], norm_ratio(m["ratio"]), m["mod_hash"]) in before for m in res2["measurements"])
    assert s["skipped"] == again and s["added"] == len(res2["measurements"]) - again
    for c in m2["candidates"]:
        if c["source"] == "transfer":
            assert all(("cpu", norm_ratio(float(x.split(":")[1].rstrip("%"))), c["mod_hash"]) in after
                       for x in c["shares"])
    # a third round starts from everything measured so far and still repeats nothing
    r = run_cli("bundle", "build", "--space", d / "space.toml", "--target", "cpu", "--candidates", "2",
                "--db", rounds["db_path"], "--out", d / "r3", "--share", "cpu:100", timeout=600)
    assert r.returncode == 0, r.stderr
    m3 = load_manifest(str(d / "r3"))
    new3 = [c for c in m3["candidates"] if c["source"] in NEW]
    assert new3 and not {c["mod_hash"] for c in new3} & {h for (_, _, h) in after}
    assert all(c["for"] == [["cpu", 100.0, "none"]] for c in new3)


def _gpu(name, driver):
    return DeviceInfo(kind="cuda", name=name, units=132, unit="SM", driver=driver, arch="sm_90")


@pytest.mark.parametrize("case", ["none", "two", "unknown", "arch"])
def test_round_device_choice_errors_in_one_line(tmp_path, case):
    (tmp_path / "space.toml").write_text(SPACE)
    db_path = tmp_path / "db.sqlite"
    with TuningDatabase(db_path, create=True) as db:
        if case == "two":
            db.add_device(_gpu("NVIDIA H200", "580.159.04"))
            db.add_device(_gpu("NVIDIA H100 80GB HBM3", "580.159.04"))
        elif case == "arch":
            db.add_device(DeviceInfo(kind="cuda", name="NVIDIA A100", units=108, unit="SM", driver="580",
                                     arch="sm_80"))
        elif case == "unknown":
            db.add_device(_gpu("NVIDIA H200", "580.159.04"))
    extra = {"unknown": ["--device", "cuda-000000000000"], "arch": ["--arch", "sm_90"]}.get(case, [])
    r = run_cli("bundle", "build", "--space", tmp_path / "space.toml", "--db", db_path, "--out", tmp_path / "b",
                *extra, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    msg = r.stderr
    assert {"none": "no GPU device recorded", "two": "--device ID", "unknown": "no device 'cuda-000000000000'",
            "arch": "--arch sm_80"}[case] in msg
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_cpu_bundle_refuses_gpu_conditions(rounds):
    from spatialtune.errors import ConfigError

    with pytest.raises(ConfigError, match="cpu"):
        run_bundle(str(rounds["d"] / "r1"), str(rounds["d"] / "x"), [parse_condition("mps:50")])
    assert json.loads((rounds["d"] / "r1" / "manifest.json").read_text())["target"]["kind"] == "llvm"
