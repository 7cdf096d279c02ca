"""Whole models in a bundle: compiled per share on the CPU host (each task's record at the share,
else the whole device's, else the default schedule), exported for CUDA with cubins embedded, run
end to end under each condition by ``bundle run`` and imported as model runs; the device-time
estimate of a run. The CPU bundle path runs here for real; the CUDA path is built here and run
only where there is a GPU."""

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

from conftest import HAS_GPU, run_cli
from spatialtune.bundle.estimate import DeviceCosts, RunPlan, estimate, kernels_per_condition
from spatialtune.measure.runner import RunSettings
from spatialtune.store.database import TuningDatabase

QUICK = dict(batch=1, population=16, genetic_iters=1, run=RunSettings(repeat=2, min_repeat_ms=5, warmup_ms=5))


def mlp(path, batch=4):
    """x[batch,16] -> MatMul+Add+Relu (32) -> MatMul+Add (8), plus a scalar scale: two tasks. One
    weight is named as PyTorch's exporter names them (``onnx::``), which TVM's importer drops."""
    rng = np.random.default_rng(0)
    w = lambda name, shape: numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "onnx::w2"], ["y0"]),
             helper.make_node("Add", ["y0", "b2"], ["y1"]), helper.make_node("Mul", ["y1", "s"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8])],
                          [w("w1", (16, 32)), w("b1", (32,)), w("onnx::w2", (32, 8)), w("b2", (8,)),
                           numpy_helper.from_array(np.array(0.5, np.float32), "s")])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def empty_bundle(d, target: dict, arch: str):
    """A bundle with no kernel candidates, as ``bundle build`` writes its manifest."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"format": 1, "target": target, "arch": arch, "tvm_version": "",
                                                 "seed": 0, "workloads": {}, "candidates": []}))
    return d


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The MLP's tasks tuned on this CPU: both at 100 %, only the heaviest at 50 %."""
    from spatialtune.tuning import TuneOptions, tune
    from spatialtune.workloads.spec import load_space

    d = tmp_path_factory.mktemp("models")
    mlp(d / "mlp.onnx")
    run_cli("workloads", "--from-onnx", d / "mlp.onnx", "--out", d / "mlp.toml", check=True)
    tasks = load_space(d / "mlp.toml").workloads
    assert len(tasks) == 2
    with TuningDatabase(d / "db.sqlite") as db:
        tune(tasks, [100], db, TuneOptions(trials=1, **QUICK))
        tune(tasks[:1], [50], db, TuneOptions(trials=1, **QUICK))
    return d, tasks


@pytest.fixture(scope="module")
def cpu_bundle(tuned):
    from spatialtune.device import detect_cpu

    d, _ = tuned
    b = empty_bundle(d / "bundle", {"kind": "llvm"}, detect_cpu().arch)
    r = run_cli("bundle", "models", b, d / "mlp.onnx", "--db", d / "db.sqlite", "--params-from", "256",
                timeout=600)
    assert r.returncode == 0, r.stderr
    return b


def test_a_share_gets_its_records_else_the_whole_devices(tuned, cpu_bundle):
    _, tasks = tuned
    (m,) = json.loads((cpu_bundle / "manifest.json").read_text())["models"]
    assert m["name"] == "mlp" and m["n_tasks"] == 2 and m["inputs"] == [{"name": "x", "shape": [4, 16],
                                                                         "dtype": "float32"}]
    # the two weight matrices are drawn from the seed, not carried; biases and the scalar stay inside
    assert sorted((p["name"], p["onnx"]) for p in m["params"]) == [("w1", "w1"), ("w2", "onnx::w2")]
    assert all(p["std"] > 0 for p in m["params"])
    by_id = {v["id"]: v for v in m["variants"]}
    assert set(by_id) == {"mlp/cpu:100%", "mlp/cpu:50%"}
    whole, half = by_id["mlp/cpu:100%"], by_id["mlp/cpu:50%"]
    assert whole["variant"] == "whole-tuned" and half["variant"] == "share-tuned"
    assert whole["tuned_tasks"] == half["tuned_tasks"] == 2 and half["file"] != whole["file"]
    assert {t["schedule"] for t in whole["tasks"].values()} == {"tuned at cpu:100%"}
    assert half["tasks"][tasks[0].key]["schedule"] == "tuned at cpu:50%"
    assert half["tasks"][tasks[1].key]["schedule"] == "tuned at cpu:100% (fallback)"
    assert (cpu_bundle / m["reference"]).is_file() and (cpu_bundle / m["skeleton"]).stat().st_size < 4096


def test_the_models_run_per_condition_and_import_as_model_runs(tuned, cpu_bundle, tmp_path):
    from spatialtune.store.model_runs import model_runs

    d, _ = tuned
    r = run_cli("bundle", "run", cpu_bundle, "--out", tmp_path / "r", "--condition", "cpu:100", "--condition",
                "cpu:50", "--model-rounds", "2", "--model-min-repeat-ms", "5", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "mlp" in r.stdout and "ONNX Runtime on this device: onnxruntime" in r.stdout
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    rows = {(x["condition"], x["variant"]): x for x in res["model_runs"]}
    assert set(rows) == {(c, v) for c in ("cpu:100%", "cpu:50%") for v in ("whole-tuned", "share-tuned", "onnxruntime")}
    for x in rows.values():
        assert x["status"] == "ok", x
        assert x["rel_err"] < 1e-4 and x["latency_s"] > 0 and len(x["times"]) == 2
    assert rows["cpu:100%", "share-tuned"]["detail"]["same_as"] == "whole-tuned"  # one library, timed once
    assert "same_as" not in rows["cpu:50%", "share-tuned"]["detail"]  # its own kernels
    assert rows["cpu:50%", "share-tuned"]["granted_units"] == 1
    db_path = d / "imported.sqlite"
    r = run_cli("bundle", "import", tmp_path / "r", "--db", db_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "6 model runs" in r.stdout
    again = run_cli("bundle", "import", tmp_path / "r", "--db", db_path, timeout=300)
    assert again.returncode == 0 and "; 0 model runs" in again.stdout
    with TuningDatabase(db_path, create=False) as db:
        got = model_runs(db)
    assert len(got) == 6 and {g.variant for g in got} == {"whole-tuned", "share-tuned", "onnxruntime"}
    half = next(g for g in got if g.ratio == 50.0 and g.variant == "share-tuned")
    assert half.tuned_tasks == 2 and half.detail["interference"] == "none"


def _cuda_compiler():
    from spatialtune.cuda.cubin import find_nvcc

    if not find_nvcc():
        try:
            import cuda.bindings.nvrtc  # noqa: F401
        except ImportError:
            pytest.skip("neither nvcc nor NVRTC here: cannot build cubins")


@pytest.fixture(scope="module")
def cuda_bundle(tuned):
    """The MLP in a CUDA bundle for sm_90 (no GPU records: every task gets the default schedule)."""
    _cuda_compiler()
    d, _ = tuned
    b = empty_bundle(d / "cuda-bundle", {"kind": "cuda", "arch": "sm_90"}, "sm_90")
    r = run_cli("bundle", "models", b, d / "mlp.onnx", "--params-from", "256", timeout=600)
    assert r.returncode == 0, r.stderr
    return b


H200 = {"kind": "cuda", "name": "NVIDIA H200", "units": 132, "unit": "SM", "driver": "580.159.04", "arch": "sm_90",
        "tvm_version": "", "uuid": "GPU-models-test"}


@pytest.fixture(scope="module")
def cuda_records(tuned):
    """A database with CUDA records of the MLP's tasks, as a GPU round leaves it: kernels built
    here by a bundle round, their times imported as an H200's (both tasks at MPS 100 %, the
    heaviest also at 50 %)."""
    _cuda_compiler()
    d, tasks = tuned
    r = run_cli("bundle", "build", "--space", d / "mlp.toml", "--target", "cuda", "--arch", "sm_90", "--candidates",
                "2", "--build-workers", "2", "--out", d / "round", timeout=900)
    assert r.returncode == 0, r.stderr
    man = json.loads((d / "round" / "manifest.json").read_text())
    ok: dict[str, list] = {}
    for c in man["candidates"]:
        if c["status"] == "ok":
            ok.setdefault(c["workload_key"], []).append(c)
    assert set(ok) == {w.key for w in tasks}
    # at 100 % each task's first kernel; at 50 % the heaviest task's last (another, where two built)
    picks = [(100.0, 132, k, cs[0]) for k, cs in ok.items()] + [(50.0, 66, tasks[0].key, ok[tasks[0].key][-1])]
    rows = [{"candidate": c["id"], "workload_key": k, "mod_hash": c["mod_hash"], "partition": "mps", "ratio": ratio,
             "planned_units": units, "total_units": 132, "interference": "none", "condition": f"mps:{ratio:g}%",
             "status": "ok", "times": [1e-5] * 3, "median_s": 1e-5, "rel_err": 1e-7, "granted_units": units}
            for ratio, units, k, c in picks]
    (d / "round-results").mkdir()
    (d / "round-results" / "manifest.json").write_text(json.dumps(man))
    (d / "round-results" / "results.json").write_text(json.dumps({
        "format": 1, "device": H200, "bundle": str(d / "round"), "conditions": [], "measurements": rows}))
    r = run_cli("bundle", "import", d / "round-results", "--db", d / "cuda.sqlite", timeout=300)
    assert r.returncode == 0, r.stderr
    return d / "cuda.sqlite", len(ok[tasks[0].key]) > 1


def test_a_gpu_share_compiles_its_records_with_cubins(tuned, cuda_records):
    """The CUDA records replay on the model's functions (weights lifted out), the rest of a
    share falls back to the whole device's record, a partition never tuned gets the default
    schedule, and every library holds cubins."""
    from spatialtune.cuda.embed import library_formats

    d, tasks = tuned
    db_path, own_kernel_at_50 = cuda_records
    b = empty_bundle(d / "cuda-tuned", {"kind": "cuda", "arch": "sm_90"}, "sm_90")
    r = run_cli("bundle", "models", b, d / "mlp.onnx", "--db", db_path, "--params-from", "256", timeout=900)
    assert r.returncode == 0, r.stderr
    (m,) = json.loads((b / "manifest.json").read_text())["models"]
    by_id = {v["id"]: v for v in m["variants"]}
    assert set(by_id) == {"mlp/mps:100%", "mlp/green:100%", "mlp/mps:50%"}
    whole, half, green = by_id["mlp/mps:100%"], by_id["mlp/mps:50%"], by_id["mlp/green:100%"]
    assert whole["tuned_tasks"] == half["tuned_tasks"] == 2 and green["tuned_tasks"] == 0
    assert {t["schedule"] for t in whole["tasks"].values()} == {"tuned at mps:100%"}
    assert half["tasks"][tasks[0].key]["schedule"] == "tuned at mps:50%"
    assert half["tasks"][tasks[1].key]["schedule"] == "tuned at mps:100% (fallback)"
    assert {t["schedule"] for t in green["tasks"].values()} == {"default GPU schedule (dlight)"}
    assert green["file"] != whole["file"]
    # the same kernel for every task is one library, whichever share's record chose it
    assert (half["file"] != whole["file"]) == own_kernel_at_50 and ("same_as" in half) != own_kernel_at_50
    for v in (whole, half, green):
        assert library_formats(str(b / v["file"])) == ["cubin"]


def test_the_cuda_model_library_holds_cubins_and_no_source(cuda_bundle):
    from spatialtune.cuda.embed import library_formats, split_cuda_payload

    (m,) = json.loads((cuda_bundle / "manifest.json").read_text())["models"]
    # no GPU records: one library, whole device of each partition, every task on the default schedule
    assert {(v["partition"], v["ratio"]) for v in m["variants"]} == {("mps", 100.0), ("green", 100.0)}
    assert len({v["file"] for v in m["variants"]}) == 1
    v = m["variants"][0]
    assert v["tuned_tasks"] == 0 and {t["schedule"] for t in v["tasks"].values()} == {"default GPU schedule (dlight)"}
    assert v["default_functions"] >= 2
    lib = (cuda_bundle / v["file"]).read_bytes()
    assert library_formats(str(cuda_bundle / v["file"])) == ["cubin"]
    assert b"__global__" not in lib and b"extern \"C\"" not in lib  # nothing left for NVRTC at load
    cubin = lib[lib.index(b"\x7fELF", lib.index(b"cubin")):]
    assert int.from_bytes(cubin[18:20], "little") == 190  # an ELF for EM_CUDA: machine code, not PTX
    u64 = lambda n: n.to_bytes(8, "little")  # noqa: E731
    assert split_cuda_payload(u64(4) + b"cuda" + u64(0) + u64(1) + b"x") == (b"cuda", u64(0), b"x")
    with pytest.raises(Exception, match="layout"):  # a payload that does not add up is refused, never guessed
        split_cuda_payload(u64(4) + b"cuda" + u64(0) + u64(1) + b"x!")
    with pytest.raises(Exception, match="ends early"):
        split_cuda_payload(u64(4) + b"cuda" + u64(0) + u64(9) + b"x")


@pytest.mark.gpu
def test_the_cuda_model_runs_on_the_gpu_without_compiling(cuda_bundle, tmp_path):
    r = run_cli("bundle", "run", cuda_bundle, "--out", tmp_path / "r", "--condition", "mps:100", "--condition",
                "green:100", "--model-rounds", "2", timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    tvm_rows = [x for x in res["model_runs"] if x["variant"] != "onnxruntime"]
    assert tvm_rows and all(x["status"] == "ok" and x["rel_err"] < 1e-4 for x in tvm_rows), tvm_rows
    assert res["onnxruntime"]  # its provider, or why it is not available


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU path")
def test_bundle_models_bad_input_is_one_line(tmp_path):
    b = empty_bundle(tmp_path / "b", {"kind": "llvm"}, "x")
    model = mlp(tmp_path / "m.onnx")
    for args, msg in ((["bundle", "models", b, tmp_path / "missing.onnx"], "no such ONNX file"),
                      (["bundle", "models", tmp_path, model], "not a bundle"),
                      (["bundle", "models", b, model, "--params-from", "0"], "must be positive"),
                      (["bundle", "estimate", tmp_path, "--conditions", "2"], "not a bundle"),
                      (["bundle", "estimate", b, "--conditions", "0"], "must be positive")):
        r = run_cli(*args, timeout=120)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and msg in r.stderr, (args, r.stderr)


def _manifest(n_per_workload=(40, 20), keep=2, models=1, share_variant=True):
    cands = []
    for w, n in enumerate(n_per_workload):
        cands += [{"workload_key": f"w{w}", "status": "ok", "source": "transfer" if i < keep and w == 0 else "search"}
                  for i in range(n)]
    cands.append({"workload_key": "w0", "status": "build_error", "source": "search"})
    variants = [{"variant": "whole-tuned", "file": "a.so"}] + \
        ([{"variant": "share-tuned", "file": "b.so"}] if share_variant else [])
    return {"target": {"kind": "cuda"}, "candidates": cands,
            "workloads": {"w0": {"op": "matmul"}, "w1": {"op": "conv2d"}},
            "models": [{"variants": variants}] * models}


def test_the_estimate_counts_what_the_run_does():
    c = DeviceCosts(setup_s=10, condition_s=2, load_s=0.01, kernel_s=0.1, vendor_first_s=5, vendor_s=1,
                    model_load_s=3, onnxruntime_load_s=4, slot_overhead_s=0.05)
    man = _manifest()
    assert kernels_per_condition(man, None) == (60, 60)
    assert kernels_per_condition(man, 10) == (60, 10 + 10 + 2)  # each workload's top 10, plus the kept transfers
    e = estimate(man, RunPlan(conditions=3, top=10, model_rounds=2, model_min_repeat_ms=50), c)
    measured = 60 + 2 * 22
    assert e["load"] == pytest.approx(10 + measured * 0.01, abs=0.1)
    assert e["measure"] == pytest.approx(3 * 2 + measured * 0.1, abs=0.1)
    assert e["vendor"] == pytest.approx(3 * (5 + 1))  # one matmul-like workload
    # per condition: two libraries (3 s + 2 slots each) and ONNX Runtime (4 s + 2 slots)
    assert e["models"] == pytest.approx(3 * (2 * (3 + 2 * 0.1) + 4 + 2 * 0.1), abs=0.1)
    assert e["total"] == pytest.approx(e["load"] + e["measure"] + e["vendor"] + e["models"], abs=0.2)
    assert e["run"] == pytest.approx(e["total"] - 10, abs=0.1)
    lean = estimate(man, RunPlan(conditions=3, top=10, vendor=False, models=False), c)
    assert lean["vendor"] == lean["models"] == 0 and lean["measure"] == e["measure"]
    one = estimate(_manifest(share_variant=False), RunPlan(conditions=1, onnxruntime=False, model_rounds=1), c)
    assert one["models"] == pytest.approx(3 + 0.1, abs=0.05)
    cpu = estimate(man | {"target": {"kind": "llvm"}}, RunPlan(conditions=2), c)
    assert cpu["vendor"] == 0  # no cuBLAS on a CPU bundle


def test_the_estimate_refuses_a_run_over_budget(tmp_path):
    b = empty_bundle(tmp_path / "b", {"kind": "cuda", "arch": "sm_90"}, "sm_90")
    ok = run_cli("bundle", "estimate", b, "--conditions", "11", "--budget", "600", timeout=120)
    assert ok.returncode == 0 and "device-time estimate: load" in ok.stdout, ok.stderr
    over = run_cli("bundle", "estimate", b, "--conditions", "200", "--budget", "60", timeout=120)
    assert over.returncode == 2 and "exceeds the budget" in over.stderr and len(over.stderr.strip().splitlines()) == 1
