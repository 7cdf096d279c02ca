"""The search loop in rounds through bundles (issue 3, item 5), for real on this host.

Round 1: a bundle built for this host's cores (``--target cpu``: the same search, builder,
manifest, runner and import as a GPU bundle, measurable without a GPU), run under two shares of
the cores with ``--top 2`` (so the 100% pool is larger than the 50% one), imported into a
database (which retrains the per-share cost models). Round 2: ``bundle build --db`` proposes
new candidates from that database. Every time in the database was measured here; nothing is
made up. The device-selection errors use device rows only.
"""

import json

import pytest

from conftest import run_cli
from spatialtune.bundle.build import build_bundle
from spatialtune.bundle.importer import import_results
from spatialtune.bundle.manifest import load_manifest
from spatialtune.bundle.run import run_bundle
from spatialtune.terms import parse_condition
from spatialtune.store.database import TuningDatabase
from spatialtune.terms import norm_ratio
from spatialtune.device import DeviceInfo

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


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
    d = tmp_path_factory.mktemp("rounds")
    (d / "space.toml").write_text(SPACE)
    m1 = build_bundle(str(d / "space.toml"), [], str(d / "r1"), candidates=5, target="cpu", build_workers=2)
    res1 = run_bundle(str(d / "r1"), str(d / "res1"), [parse_condition(c) for c in CONDS], top=2, **RUN)
    db_path = d / "db.sqlite"
    with TuningDatabase(db_path, create=True) as db:
        imp1 = import_results(str(d / "res1"), db)
        before = {(m.partition, norm_ratio(m.ratio), m.mod_hash): m for m in db.measurements()}
    r = run_cli("-v", "bundle", "build", "--space", d / "space.toml", "--target", "cpu", "--candidates", "4",
                "--transfer-top", "3", "--explore", "mm_tiny=2", "--db", db_path, "--out", d / "r2", timeout=600)
    assert r.returncode == 0, r.stderr
    m2 = load_manifest(str(d / "r2"))
    return dict(d=d, m1=m1, res1=res1, imp1=imp1, db_path=db_path, before=before, cli=r, m2=m2)


def test_round1_measured_for_real(rounds):
    res1, imp1 = rounds["res1"], rounds["imp1"]
    ok100 = [m for m in res1["measurements"] if m["condition"] == "cpu:100%" and m["status"] == "ok"]
    ok50 = [m for m in res1["measurements"] if m["condition"] == "cpu:50%" and m["status"] == "ok"]
    assert len(ok100) >= 4 and len(ok50) == 2  # --top 2 after the whole host
    assert all(m["median_s"] > 0 and m["rel_err"] < 1e-3 for m in ok100 + ok50)
    assert imp1["added"] == len(res1["measurements"]) and imp1["cost_models"] == 2
    assert res1["device"]["kind"] == "cpu"


def test_round2_proposes_nothing_already_measured(rounds):
    before, m2 = rounds["before"], rounds["m2"]
    measured = {h for (_, _, h) in before}
    # --candidates 4 per share (the policy's own uniform picks are for a share too), --explore 2 per workload
    new = [c for c in m2["candidates"] if c["source"] in ("search", "explore") and c["for"]]
    explore = [c for c in m2["candidates"] if c["source"] == "explore" and not c["for"]]
    assert len(new) == 8 and len(explore) == 2
    assert sorted(sum((c["shares"] for c in new), [])) == ["cpu:100%"] * 4 + ["cpu:50%"] * 4
    assert not {c["mod_hash"] for c in new + explore} & measured
    assert all(len(c["features"]) > 10 for c in new + explore)
    assert len({c["mod_hash"] for c in m2["candidates"]}) == len(m2["candidates"])
    assert all(c["status"] == "ok" for c in m2["candidates"])
    info = m2["round"]
    with TuningDatabase(rounds["db_path"], create=False) as db:
        (dev,) = db.devices()
    assert info["device_id"] == dev["id"]
    shares = info["workloads"]["matmul_fp32_M64_N64_K64"]["shares"]
    assert set(shares) == {"cpu:100%", "cpu:50%"}
    # each share's search ranked with the model the import saved for it, trained on both shares' rows
    n_ok = sum(m.status == "ok" for m in before.values())
    assert shares["cpu:100%"]["cost_model"] == "xgb" and shares["cpu:100%"]["cost_model_samples"] == n_ok
    assert shares["cpu:50%"]["cost_model"] == "xgb" and shares["cpu:50%"]["cost_model_samples"] == n_ok
    assert "8 new" in rounds["cli"].stdout


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
    assert all(got[h]["shares"] == [want_transfer[h]] for h in got)
    anchors = {c["mod_hash"] for c in m2["candidates"] if c["source"] == "best"}
    assert anchors == (set(best(100.0)) | set(best(50.0))) - set(want_transfer)


def test_round2_runs_and_imports(rounds):
    """Round 2 through the same run and import: the transfers get their missing share, the
    winners are re-measured (the first measurement stands), the new candidates are added."""
    d, m2, before = rounds["d"], rounds["m2"], rounds["before"]
    res2 = run_bundle(str(d / "r2"), str(d / "res2"), [parse_condition(c) for c in CONDS], top=1, **RUN)
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
    new3 = {c["mod_hash"] for c in m3["candidates"] if c["source"] == "search"}
    assert new3 and not new3 & {h for (_, _, h) in after}
    assert list(m3["round"]["workloads"]["matmul_fp32_M64_N64_K64"]["shares"]) == ["cpu:100%"]


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
