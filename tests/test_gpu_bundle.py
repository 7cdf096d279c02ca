"""Bundles: build here (real search, real cubins checked by cuobjdump or the ELF header), results
imported into the database with the GPU's device record and retrained cost models; conditions
and the report. One small build for the whole file (CUDA candidate generation pays TVM's
tensor-intrinsic import once per process)."""

import hashlib
import json
import os
import re
import shutil

import pytest

from conftest import HAS_GPU, run_cli
from spatialtune.bundle.manifest import load_manifest
from spatialtune.bundle.table import check_targets, format_table
from spatialtune.terms import Condition, parse_condition
from spatialtune.errors import ConfigError

SPACE = """
[space]
name = "gpu-tiny"

[[workload]]
name = "mm_tiny"
op = "matmul"
dtype = "fp32"
shape = { M = 64, N = 64, K = 64 }
"""

H200 = {"kind": "cuda", "name": "NVIDIA H200", "units": 132, "unit": "SM", "driver": "580.159.04",
        "arch": "sm_90", "tvm_version": "", "uuid": "GPU-test"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from spatialtune.cuda.cubin import find_nvcc

    if not find_nvcc():
        try:
            import cuda.bindings.nvrtc  # noqa: F401
        except ImportError:
            pytest.skip("neither nvcc nor NVRTC here: cannot precompile cubins")
    d = tmp_path_factory.mktemp("bundle")
    (d / "space.toml").write_text(SPACE)
    r = run_cli("-v", "bundle", "build", "--space", d / "space.toml", "--target", "cuda", "--arch", "sm_90",
                "--candidates", "3", "--build-workers", "2", "--out", d / "b", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "candidates built for sm_90" in r.stdout
    return d / "b"


def test_bundle_manifest_and_cubins(bundle):
    from spatialtune.cuda.cubin import check_cubin

    m = load_manifest(str(bundle))
    assert m["arch"] == "sm_90" and m["target"]["kind"] == "cuda" and m["tvm_version"]
    (wk,) = m["workloads"]
    assert wk == "matmul_fp32_M64_N64_K64" and m["workloads"][wk]["flops"] == 2 * 64 ** 3
    cands = m["candidates"]
    assert len(cands) in (1, 2, 3) and len({c["mod_hash"] for c in cands}) == len(cands)
    built = [c for c in cands if c["status"] == "ok"]
    assert built
    for c in built:
        assert c["trace"] and len(c["features"]) > 10
        so, cub = bundle / c["artifact"], bundle / c["cubin"]
        assert so.stat().st_size > 0 and so.name == f"{c['mod_hash']}.so"
        assert "sm_90" in check_cubin(str(cub), "sm_90")
        meta = json.loads((bundle / (c["cubin"] + ".json")).read_text())
        assert re.fullmatch(r"[0-9a-f]{64}", meta["source_sha256"]) and meta["arch"] == "sm_90"
        # the cubin holds the kernels the exported module's host code launches
        blob = cub.read_bytes()
        assert b"main_kernel" in blob and b"main_kernel" in so.read_bytes()
    assert "sm_90" in check_cubin(str(bundle / m["neighbour_cubin"]), "sm_90")
    if m.get("green_shim"):
        assert b"cudaSetDevice" in (bundle / m["green_shim"]).read_bytes()


def test_cubin_key_is_the_module_source(bundle):
    """Replaying a candidate's trace gives the CUDA source whose sha256 keys its cubin."""
    import tvm

    from spatialtune.cuda.cubin import cuda_source
    from spatialtune.workloads.schedule import apply_trace
    from spatialtune.workloads.spec import Workload

    m = load_manifest(str(bundle))
    c = next(c for c in m["candidates"] if c["status"] == "ok")
    w = Workload.from_dict(m["workloads"][c["workload_key"]])
    lib = tvm.compile(apply_trace(w, c["trace"]).mod, target=tvm.target.Target(m["target"]))
    key = hashlib.sha256(cuda_source(lib).encode()).hexdigest()
    assert key == json.loads((bundle / (c["cubin"] + ".json")).read_text())["source_sha256"]


def _fake_results(bundle, out):
    """What a GPU host would write: MPS 100 and 25, one wrong kernel and one crash among them."""
    m = load_manifest(str(bundle))
    os.makedirs(out, exist_ok=True)
    shutil.copy(bundle / "manifest.json", out / "manifest.json")
    ok = [c for c in m["candidates"] if c["status"] == "ok"]
    rows, conds = [], []
    for ratio, seen, scale in ((100.0, 132, [1.0, 1.5, 3.0]), (25.0, 33, [4.0, 3.0, 12.0])):
        label = f"mps:{ratio:g}%"
        ws = {}
        for i, c in enumerate(ok):
            st = "ok" if i < 2 else ("wrong_result" if ratio == 100 else "runtime_error")
            t = 1e-5 * scale[i]
            rows.append({"candidate": c["id"], "workload_key": c["workload_key"], "mod_hash": c["mod_hash"],
                         "partition": "mps", "ratio": ratio, "planned_units": seen, "total_units": 132,
                         "interference": "none", "condition": label, "status": st,
                         "error": "" if st == "ok" else st, "times": [t] * 3 if st == "ok" else [],
                         "median_s": t if st == "ok" else None, "rel_err": 1e-7 if st == "ok" else 0.5,
                         "granted_units": seen, "load_s": 0.006, "run_s": 0.05, "neighbour_throughput": None,
                         "neighbour_unit": ""})
        here = [r for r in rows if r["condition"] == label and r["status"] == "ok"]
        best = min(here, key=lambda r: r["median_s"])
        ws[ok[0]["workload_key"]] = {"measured": len(ok), "ok": len(here), "best": best["candidate"],
                                     "best_s": best["median_s"], "sms_seen": [seen], "median_load_s": 0.006,
                                     "neighbour": None, "neighbour_unit": "", "statuses": {}}
        conds.append({"condition": label, "partition": "mps", "ratio": ratio, "planned_units": seen,
                      "interference": "none", "workloads": ws})
    res = {"format": 1, "device": H200 | {"tvm_version": m["tvm_version"]}, "bundle": str(bundle), "conditions": conds,
           "measurements": rows}
    (out / "results.json").write_text(json.dumps(res))
    return res, ok


def test_import_round_trip(bundle, tmp_path):
    from spatialtune.store.database import TuningDatabase

    res, ok = _fake_results(bundle, tmp_path / "res")
    db_path = tmp_path / "db.sqlite"
    r = run_cli("bundle", "import", tmp_path / "res", "--db", db_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "NVIDIA H200" in r.stdout
    with TuningDatabase(db_path, create=False) as db:
        (dev,) = db.devices()
        assert (dev["name"], dev["units"], dev["unit"], dev["driver"], dev["arch"]) == \
            ("NVIDIA H200", 132, "SM", "580.159.04", "sm_90")
        rows = db.measurements(device_id=dev["id"])
        assert len(rows) == len(res["measurements"])
        assert {m.status for m in rows} <= {"ok", "wrong_result", "runtime_error"}
        best100 = db.best(device_id=dev["id"], partition="mps", ratio=100.0, interference="none")
        assert best100[0].mod_hash == ok[0]["mod_hash"] and best100[0].granted_units == 132
        best25 = db.best(device_id=dev["id"], partition="mps", ratio=25.0, interference="none")
        assert best25[0].mod_hash == ok[1]["mod_hash"] and best25[0].granted_units == 33
        assert abs(best25[0].granted_share - 33 / 132) < 1e-9
        if len(ok) >= 2:
            # each share's model learns from every share of the condition: 2 ok rows at 100 % and 2 at 25 %
            saved = db.load_cost_model(dev["id"], "mps", 100.0, "none")
            assert saved is not None and saved[2] == 4
    again = run_cli("bundle", "import", tmp_path / "res", "--db", db_path, timeout=300)
    assert again.returncode == 0 and "imported 0 measurements" in again.stdout


def test_table_and_checks(bundle, tmp_path):
    res, ok = _fake_results(bundle, tmp_path / "res")
    if len(ok) < 2:
        pytest.skip("needs two built candidates")
    table = format_table(res)
    assert "NVIDIA H200" in table and "mps:25%" in table
    row25 = next(ln for ln in table.splitlines() if "mps:25%" in ln)
    assert "1.33" in row25  # the 100%-best (4.0) against the best at 25% (3.0)
    checks = "\n".join(check_targets(res))
    assert "load per candidate: median 6.0 ms" in checks and "PASS" in checks


def test_conditions():
    assert parse_condition("mps:50") == Condition("mps", ratio=50.0)
    assert parse_condition("green:64sm") == Condition("green", sms=64)
    assert parse_condition("mps:50:tenant:mm_1024") == Condition("mps", ratio=50.0, interference="tenant:mm_1024")
    assert parse_condition("green:64sm").label == "green:64sm"
    assert parse_condition("cpu:50") == Condition("cpu", ratio=50.0)  # a bundle built for this host's cores
    for bad in ("mps", "mps:64sm", "cpu:8sm", "tpu:50", "mps:0", "mps:50:disk", "green:x"):
        with pytest.raises(ConfigError):
            parse_condition(bad)


def test_one_condition_for_keys_rows_and_manifests():
    """A condition is one type: the policy's key, a database row's columns and a manifest's ``for``
    (as every manifest has written it: [partition, ratio, interference]) all read back equal."""
    from spatialtune.bundle.manifest import conditions_for
    from spatialtune.bundle.pack import share_label
    from spatialtune.store.database import Measurement

    c = Condition("green", 24.2424, "compute")
    row = Measurement(workload_key="w", device_id="d", **c.to_dict(), mod_hash="h", trace="t", status="ok")
    assert Condition.of(row) == Condition.from_dict(c.to_dict()) == Condition.from_json(c.to_json()) == c
    assert conditions_for({"for": [["green", 24.24240001, "compute"], ["green", 100.0, "none"]]}) == \
        {c, Condition("green", 100.0)}
    assert json.loads(json.dumps(c.to_json())) == ["green", 24.2424, "compute"]
    assert share_label(c, 132) == "green:32sm:compute" and share_label(Condition("mps", 50.0), 132) == "mps:50%"
    with pytest.raises(ConfigError, match="no ratio"):
        parse_condition("green:64sm").to_dict()  # keyed only once a partition grants it


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU path")
def test_bundle_run_without_gpu_is_one_line(bundle, tmp_path):
    r = run_cli("bundle", "run", bundle, "--out", tmp_path / "r", timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "GPU" in r.stderr


@pytest.mark.gpu
def test_bundle_run_on_gpu(bundle, tmp_path):
    r = run_cli("bundle", "run", bundle, "--out", tmp_path / "r", "--condition", "mps:100", "--condition",
                "green:64sm", timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert {m["status"] for m in res["measurements"]} <= {"ok", "build_error"}
    assert all(m["load_s"] < 0.1 for m in res["measurements"] if m.get("load_s"))


def test_import_records_cublas_baselines(bundle, tmp_path):
    """results["baselines"]: ok rows become cublas baselines under the same key; others are not recorded."""
    from spatialtune.store.database import TuningDatabase

    res, ok = _fake_results(bundle, tmp_path / "res")
    wk = ok[0]["workload_key"]
    res["baselines"] = [
        {"workload_key": wk, "kind": "cublas", "partition": "mps", "ratio": 100.0, "planned_units": 132,
         "total_units": 132, "interference": "none", "condition": "mps:100%", "status": "ok", "times": [7e-6] * 3,
         "median_s": 7e-6, "rel_err": 2e-7, "granted_units": 132},
        {"workload_key": wk, "kind": "cublas", "partition": "mps", "ratio": 25.0, "planned_units": 33,
         "total_units": 132, "interference": "none", "condition": "mps:25%", "status": "ok", "times": [2e-5] * 3,
         "median_s": 2e-5, "rel_err": 2e-7, "granted_units": 32},
        {"workload_key": wk, "kind": "cublas", "partition": "green", "ratio": 100.0, "planned_units": 132,
         "total_units": 132, "interference": "none", "condition": "green:100%", "status": "unavailable",
         "error": "torch cannot be imported here"}]
    for c in res["conditions"]:
        c["workloads"][wk]["cublas_s"] = next(b["median_s"] for b in res["baselines"]
                                              if b["condition"] == c["condition"])
    (tmp_path / "res" / "results.json").write_text(json.dumps(res))
    db_path = tmp_path / "db.sqlite"
    r = run_cli("bundle", "import", tmp_path / "res", "--db", db_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "2 cuBLAS baselines" in r.stdout
    with TuningDatabase(db_path, create=False) as db:
        (dev,) = db.devices()
        rows = db.baselines(device_id=dev["id"])
        assert sorted((b["partition"], b["ratio"], b["kind"], b["median_s"], b["granted_units"]) for b in rows) == \
            [("mps", 25.0, "cublas", 2e-5, 32), ("mps", 100.0, "cublas", 7e-6, 132)]
    table = format_table(res)
    row25 = next(ln for ln in table.splitlines() if "mps:25%" in ln)
    assert "20.0" in row25 and "1.50" in row25  # cuBLAS 20 us; best 30 us / 20 us
    assert f"INFO cuBLAS {wk} green:100%: unavailable: torch cannot be imported here" in check_targets(res)


def test_next_gpu_round_is_tune_from_the_imported_results(bundle, tmp_path):
    """The next round of a GPU the database knows (the fake H200's imported results): ``tune``
    with the bundle runner on that device's MPS shares, cubins built here for its arch; it
    records nothing, proposes new kernels per share and carries each share's winners."""
    from spatialtune.store.database import TuningDatabase

    _, ok = _fake_results(bundle, tmp_path / "res")
    db_path = tmp_path / "db.sqlite"
    assert run_cli("bundle", "import", tmp_path / "res", "--db", db_path, timeout=300).returncode == 0
    with TuningDatabase(db_path, create=False) as db:
        n_before = db.count_measurements()
    (tmp_path / "space.toml").write_text(SPACE)
    r = run_cli("bundle", "build", "--space", tmp_path / "space.toml", "--db", db_path, "--candidates", "2",
                "--build-workers", "2", "--out", tmp_path / "b2", timeout=600)
    assert r.returncode == 0, r.stderr
    m = load_manifest(str(tmp_path / "b2"))
    with TuningDatabase(db_path, create=False) as db:
        (dev,) = db.devices()
        assert db.count_measurements() == n_before  # pending kernels are not recorded
    assert m["arch"] == "sm_90" and m["round"]["device_id"] == dev["id"]
    new = [c for c in m["candidates"] if c["source"] not in ("best", "transfer", "matrix")]
    assert sorted(sum((c["shares"] for c in new), [])) == ["mps:100%"] * 2 + ["mps:25%"] * 2
    assert not {c["mod_hash"] for c in new} & {c["mod_hash"] for c in ok}
    best = {c["mod_hash"] for c in m["candidates"] if c["source"] == "best"}
    assert best == {c["mod_hash"] for c in ok[:2]}  # the winners at 100 % and 25 %, measured again
    for c in m["candidates"]:
        assert c["cubin"].endswith(".cubin") and (tmp_path / "b2" / c["cubin"]).is_file()
    assert m["neighbour_cubin"] == "support/neighbour.cubin"
