"""Models in, per-share kernels and end-to-end latency out: ONNX models built here with
onnx.helper have their tasks extracted, tuned at two shares with a few trials, compiled whole and
run under each share next to ONNX Runtime (whose outputs they must match)."""
import re
import shutil

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

from spatialtune.errors import SpecError
from spatialtune.measure.runner import RunSettings
from spatialtune.store.database import TuningDatabase
from spatialtune.tuning import TuneOptions, tune
from spatialtune.tuning.scheduler import TaskState, costliest, due_fractions, pick_task
from spatialtune.workloads.spec import Workload, load_space

from conftest import run_cli

QUICK_RUN = RunSettings(repeat=2, min_repeat_ms=5, warmup_ms=5)
QUICK = dict(batch=2, population=16, genetic_iters=1, run=QUICK_RUN)


def _w(rng, name, shape, scale=0.3):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def dense_block(path, out=8, seed=0, batch=4):
    """x[batch,16] -> MatMul+Add+Relu (32) -> MatMul+Add (out): TVM's two-layer MLP."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["y0"]),
             helper.make_node("Add", ["y0", "b2"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out])],
                          [_w(np.random.default_rng(0), "w1", (16, 32)), _w(np.random.default_rng(1), "b1", (32,)),
                           _w(rng, "w2", (32, out)), _w(rng, "b2", (out,))])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def conv_dense_model(path):
    """A small conv block (3x3 conv with bias, relu) then a dense block with bias and activation."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["img", "cw", "cb"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["c1"]), helper.make_node("Flatten", ["c1"], ["f"], axis=1),
             helper.make_node("MatMul", ["f", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["y0"]),
             helper.make_node("Add", ["y0", "b2"], ["y"])]
    g = helper.make_graph(nodes, "convnet", [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
                          [_w(rng, "cw", (8, 4, 3, 3)), _w(rng, "cb", (8,)), _w(rng, "w1", (512, 32), 0.05),
                           _w(rng, "b1", (32,)), _w(rng, "w2", (32, 10)), _w(rng, "b2", (10,))])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def mlp_space(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlp")
    dense_block(d / "mlp.onnx")
    run_cli("workloads", "--from-onnx", d / "mlp.onnx", "--shape", "x=4,16", "--out", d / "mlp.toml", check=True)
    return d


# ---------------------------------------------------------------- tasks from a model


def test_a_two_layer_mlp_yields_its_fused_tasks(mlp_space):
    space = load_space(mlp_space / "mlp.toml")
    by_name = {w.name: w for w in space.workloads}
    assert set(by_name) == {"fused_matmul_add_relu", "fused_matmul1_add1"}
    relu, second = by_name["fused_matmul_add_relu"], by_name["fused_matmul1_add1"]
    assert re.fullmatch(r"fused_matmul_add_relu_[0-9a-f]{16}", relu.key)
    assert re.fullmatch(r"fused_matmul_add_[0-9a-f]{16}", second.key)  # the numbering is not part of the key
    assert relu.model == "mlp" and relu.weight == 1 and relu.op == "prim" and relu.dtype == "fp32"
    # destination-passing style: x, weight, bias in; the last buffer out
    assert relu.prim.args == (((4, 16), "float32"), ((16, 32), "float32"), ((32,), "float32"), ((4, 32), "float32"))
    assert relu.prim.n_outputs == 1
    assert relu.flops >= 2 * 4 * 16 * 32  # TVM's estimate: the matmul, plus the epilogue
    # the weight and the bias are the model's constants: ``cold`` times them out of the caches
    assert relu.prim.weights == (1, 2) and relu.prim.activations == [0]


def test_the_space_file_round_trips_and_an_edited_script_is_refused(mlp_space, tmp_path):
    from spatialtune.models.importer import extract_workloads, load_onnx

    fresh = extract_workloads(load_onnx(mlp_space / "mlp.onnx", {"x": (4, 16)}))
    read = load_space(mlp_space / "mlp.toml").workloads
    assert sorted((w.key, w.prim.script, w.prim.weights) for w in fresh) == sorted(
        (w.key, w.prim.script, w.prim.weights) for w in read)
    assert all(Workload.from_dict(w.to_dict()).prim == w.prim for w in read)  # as a worker gets it
    text = (mlp_space / "mlp.toml").read_text()
    for bad in ("[3]", "[true]", '"1"'):
        (tmp_path / "w.toml").write_text(text.replace("weights = [1, 2]", f"weights = {bad}", 1))
        with pytest.raises(SpecError, match=r"workload\[\d\]\.weights: must be a list of input indices below 3"):
            load_space(tmp_path / "w.toml")
    (tmp_path / "old.toml").write_text(text.replace("weights = [1, 2]\n", "", 1))  # a task written before the field
    assert {w.prim.weights for w in load_space(tmp_path / "old.toml").workloads} == {None, (1, 2)}
    edited = tmp_path / "edited.toml"
    edited.write_text(text.replace("T.max(", "T.min(", 1))
    with pytest.raises(SpecError, match=r"workload\[\d\]\.hash: the script hashes to"):
        load_space(edited)


def test_the_same_task_from_two_models_is_one_key_and_one_workload(tmp_path):
    """Two MLPs share their first layer (same shapes, other weights): one task, tuned once."""
    dense_block(tmp_path / "a.onnx", out=8, seed=0)
    dense_block(tmp_path / "b.onnx", out=12, seed=5)
    run_cli("workloads", "--from-onnx", tmp_path / "a.onnx", "--shape", "x=4,16", "--out", tmp_path / "a.toml",
            check=True)
    run_cli("workloads", "--from-onnx", tmp_path / "b.onnx", "--shape", "x=4,16", "--out", tmp_path / "b.toml",
            check=True)
    a, b = load_space(tmp_path / "a.toml").workloads, load_space(tmp_path / "b.toml").workloads
    shared = {w.key for w in a} & {w.key for w in b}
    assert len(shared) == 1 and next(iter(shared)).startswith("fused_matmul_add_relu_")
    opts = TuneOptions(trials=4, scheduler="gradient", baselines=False, **QUICK)
    with TuningDatabase(tmp_path / "db.sqlite") as db:
        tune(a, [100], db, opts)
        (key,) = shared
        spent = db.count_measurements(workload_key=key)
        tune(b, [100], db, opts)
        rows = db.db.execute("SELECT key, model FROM workloads ORDER BY key").fetchall()
        assert len(rows) == 3 and dict(rows)[key] == "a, b"
        # b's budget found the shared task's trials already measured: they went to b's own task
        assert db.count_measurements(workload_key=key) == spent
        (own,) = {w.key for w in b} - shared
        assert db.count_measurements(workload_key=own) == 4 - spent


# ---------------------------------------------------------------- the float64 reference


def test_the_reference_is_the_untuned_module_in_float64(mlp_space):
    from spatialtune.workloads.prim import float64_script

    relu = next(w for w in load_space(mlp_space / "mlp.toml").workloads if w.name == "fused_matmul_add_relu")
    script = float64_script(relu.prim)
    assert "float32" not in script and "float64" in script
    xs = relu.random_inputs(np.random.default_rng(3))
    (ref,) = relu.reference(xs)
    x, wt, b = (v.astype(np.float64) for v in xs)
    assert ref.dtype == np.float64
    # float64 throughout: a float32 intermediate would be off by ~1e-7 relative
    np.testing.assert_allclose(ref, np.maximum(x @ wt + b, 0), rtol=1e-12, atol=1e-12)


def test_a_wrong_prim_kernel_is_caught_and_a_prebuilt_reference_is_used(mlp_space, tmp_path):
    import tvm

    from spatialtune.measure.in_worker import measure_one
    from spatialtune.workloads.prim import build_reference, prim_task
    from spatialtune.workloads.spec import Workload

    relu = next(w for w in load_space(mlp_space / "mlp.toml").workloads if w.name == "fused_matmul_add_relu")
    right = tmp_path / "right.so"
    tvm.compile(relu.ir_module(), target=tvm.target.Target({"kind": "llvm"})).export_library(str(right))
    broken = Workload.from_prim(prim_task(relu.prim.script.replace("T.max(", "T.min(", 1), "broken"))
    wrong = tmp_path / "wrong.so"
    tvm.compile(broken.ir_module(), target=tvm.target.Target({"kind": "llvm"})).export_library(str(wrong))
    settings = RunSettings(repeat=1, min_repeat_ms=1, warmup_ms=0)
    assert measure_one(relu.to_dict(), str(right), None, settings, 1)["status"] == "ok"
    bad = measure_one(relu.to_dict(), str(wrong), None, settings, 1)
    assert bad["status"] == "wrong_result" and "float64 reference" in bad["error"]
    # a bundle host loads the reference built on the CPU host: given the broken one, the right
    # kernel is the one that fails, so the library is what it was checked against
    lib = tmp_path / "ref.so"
    build_reference(broken.prim, str(lib))
    assert measure_one(relu.to_dict() | {"reference_lib": str(lib)}, str(right), None, settings, 1)["status"] == \
        "wrong_result"


# ---------------------------------------------------------------- scheduling a model's trials


def test_first_batches_for_every_task_then_trials_follow_weight_times_time():
    tasks = [TaskState("conv", 1, 0, None), TaskState("dense", 2, 0, None), TaskState("tail", 1, 0, None)]
    order = []
    for _ in range(3):
        i = pick_task(tasks, 4)
        order.append(tasks[i].name)
        tasks[i].spent += 4
    assert order == ["dense", "conv", "tail"]  # everyone measured once, heaviest weight first
    times = {"conv": 3e-3, "dense": 0.5e-3, "tail": 1e-3}  # costs 3 : 1 : 1
    for t in tasks:
        t.best_s = times[t.name]
    for _ in range(45):
        i = pick_task(tasks, 4)
        tasks[i].spent += 4
    spent = {t.name: t.spent for t in tasks}
    assert spent["conv"] == max(spent.values())
    for t, due in zip(tasks, due_fractions(tasks)):
        assert abs(t.spent - due * 192) <= 4 + 1e-9, spent  # within one batch of its due share
    assert costliest(tasks).name == "conv"
    tasks[0].done = True
    assert tasks[pick_task(tasks, 4)].name != "conv"
    for t in tasks:
        t.done = True
    assert pick_task(tasks, 4) is None


def test_a_task_at_its_onnx_runtime_floor_takes_no_trials_while_another_is_behind(tmp_path):
    """The floor is ONNX Runtime's time for the task's operators (from a stored --profile): the
    costliest task, once at its floor, leaves the trials to the task still slower than ORT."""
    from dbutil import CPU
    from spatialtune.store.model_runs import ModelRun, record_model_run, vendor_floors

    with TuningDatabase(tmp_path / "f.sqlite") as db:
        db.add_device(CPU)
        prof = {"ratio": 50.0, "tvm_total_s": 9e-3, "ort_total_s": 5e-3, "outside": {},
                "tasks": [{"key": "conv-key", "name": "conv", "weight": 1, "tvm_s": 6e-3, "ort_s": 7e-3},
                          {"key": "dense-key", "name": "dense", "weight": 2, "tvm_s": 2e-3, "ort_s": 1e-3}]}
        for ratio, p in ((50.0, prof), (100.0, {"tasks": [{"key": "conv-key", "weight": 1, "ort_s": 1e-9}]})):
            record_model_run(db, ModelRun("r1", "m", "h", CPU.id, "cpu", ratio, "share-tuned", "ok",
                                          detail={"profile": p}))
        floors = vendor_floors(db, CPU.id, "cpu", 50.0)
    assert floors == {"conv-key": 7e-3, "dense-key": 0.5e-3}  # per call: ORT's time over the weight
    tasks = [TaskState("conv", 1, 8, 6e-3, floor_s=floors["conv-key"]),
             TaskState("dense", 2, 8, 1e-3, floor_s=floors["dense-key"])]
    assert tasks[0].at_floor and not tasks[1].at_floor
    picks = [tasks[pick_task(tasks, 4)].name for _ in range(3)]
    assert picks == ["dense"] * 3  # without the floor, conv (6 ms of 8) would be due most of them
    tasks[0].floor_s = None
    assert tasks[pick_task(tasks, 4)].name == "conv"
    tasks[1].best_s = 0.4e-3  # both at their floors: the plain gradient rule again
    tasks[0].floor_s = floors["conv-key"]
    assert tasks[pick_task(tasks, 4)].name == "conv"


def test_with_floors_the_trials_follow_the_time_each_task_is_behind_them():
    """A light task far behind ONNX Runtime is due more than a heavy one nearly level with it; a
    task ORT has no node for is taken to be as far behind, for its time, as the others together."""
    big = TaskState("conv", 1, 8, 2.0e-3, floor_s=1.9e-3)  # costs 2 ms, 0.1 ms behind
    small = TaskState("mean", 1, 8, 0.13e-3, floor_s=0.03e-3)  # costs 0.13 ms, 0.1 ms behind
    assert due_fractions([big, small]) == pytest.approx([0.5, 0.5])
    assert due_fractions([TaskState("conv", 1, 8, 2.0e-3), TaskState("mean", 1, 8, 0.13e-3)]) == \
        pytest.approx([2.0 / 2.13, 0.13 / 2.13])  # no floors: weight x time, as before
    spare = TaskState("layout", 2, 8, 0.5e-3)  # no floor; the floored tasks are 0.2 of 2.13 ms behind
    fr = due_fractions([big, small, spare])
    assert fr[2] / fr[0] == pytest.approx(2 * 0.5e-3 * (0.2e-3 / 2.13e-3) / 0.1e-3)
    failing = TaskState("failing", 1, 8, None, floor_s=1e-3)  # weighed as the costliest gap
    assert due_fractions([big, small, failing]) == pytest.approx([1 / 3] * 3)


def test_floors_profiled_before_tuning_are_read_by_the_scheduler(tmp_path):
    """ONNX Runtime profiled alone at two shares (no tuned kernel needed): each task gets ORT's
    time for its nodes per call as its floor at each share, which vendor_floors hands the
    scheduler, and the CLI does the same in one line."""
    from spatialtune.device import detect_cpu
    from spatialtune.models.e2e import ModelOptions
    from spatialtune.models.floors import profile_floors
    from spatialtune.models.importer import space_from_onnx
    from spatialtune.store.model_runs import vendor_floors

    path = dense_block(tmp_path / "mlp.onnx")
    _, tasks = space_from_onnx([path], {"x": [4, 16]})
    opts = ModelOptions(rounds=2, min_repeat_ms=5, warmup_ms=5)
    with TuningDatabase(tmp_path / "f.sqlite") as db:
        got = profile_floors(path, [100, 50], db, shapes={"x": [4, 16]}, options=opts)
        assert sorted(got) == [50.0, 100.0]
        dev = detect_cpu().id
        for r in (100.0, 50.0):
            floors = vendor_floors(db, dev, "cpu", r)
            assert floors == got[r]
            assert set(floors) == {w.key for w in tasks}  # each fused MatMul+Add(+Relu) has its ORT nodes
            assert all(0 < s < 0.01 for s in floors.values())
    out = run_cli("model", path, "--shape", "x=4,16", "--ratios", "100", "--floors", "--rounds", "1",
                  "--min-repeat-ms", "5", "--db", tmp_path / "c.sqlite")
    assert out.returncode == 0, out.stderr
    assert re.search(r"floors for 2 of 2 tasks", out.stdout + out.stderr)


def test_a_small_budget_gives_short_first_rounds_and_finishes_a_round_cut_short():
    from spatialtune.tuning.scheduler import first_round

    assert first_round(11, 128, 16) == 4 and first_round(2, 256, 16) == 16 and first_round(3, 8, 2) == 2
    conv = TaskState("conv", 1, 2, 2e-3)  # its first step measured two transfers only
    tiny = TaskState("layout", 1, 0, None)
    assert pick_task([conv, tiny], 16, first=4) == 1  # a task never measured comes first
    tiny.spent, tiny.best_s = 4, 1e-6
    assert pick_task([conv, tiny], 16, first=4) == 0  # then the rest of conv's first round
    conv.spent = 4
    big, small = TaskState("big", 1, 4, 1e-3), TaskState("small", 1, 2, 1e-5)
    assert pick_task([big, small], 16, first=4) == 1  # cheap or not, a round cut short is finished


def test_a_task_without_a_working_kernel_still_gets_trials():
    tasks = [TaskState("ok", 1, 8, 1e-3), TaskState("failing", 1, 8, None)]
    assert due_fractions(tasks) == [0.5, 0.5]


# ---------------------------------------------------------------- tuned at two shares, run end to end


def test_a_model_tuned_at_two_shares_runs_end_to_end_and_matches_onnx_runtime(tmp_path):
    from spatialtune.lookup import Lookup
    from spatialtune.lookup.apply import build_kernel, check_kernel
    from spatialtune.lookup.metaschedule import export_metaschedule
    from spatialtune.models.e2e import ModelOptions, measure_model
    from spatialtune.report.data import compute_report
    from spatialtune.store.model_runs import model_runs

    model = conv_dense_model(tmp_path / "convnet.onnx")
    run_cli("workloads", "--from-onnx", model, "--out", tmp_path / "convnet.toml", check=True)
    tasks = load_space(tmp_path / "convnet.toml").workloads
    assert any(w.name.startswith("fused_conv2d") for w in tasks) and any("matmul" in w.name for w in tasks)
    batch_each = 2 * len(tasks)
    with TuningDatabase(tmp_path / "db.sqlite") as db:
        summary = tune(tasks, [50, 100], db, TuneOptions(trials=batch_each, scheduler="gradient", **QUICK))
        for r in (50, 100):
            # the budget, every task in it (beyond it, the winners matrix measures 100 % winners at 50 % and back)
            per_task = [sum(m.source != "matrix" for m in db.measurements(workload_key=w.key, ratio=r)) for w in tasks]
            assert sum(per_task) == batch_each and min(per_task) >= 1, per_task
        for w in tasks:  # each task's 100 % winners were measured at 50 %: the share-tuned pick is never slower
            rows = db.measurements(workload_key=w.key, status="ok")
            at50 = {m.mod_hash: m.median_s for m in rows if m.ratio == 50}
            top100 = sorted((m for m in rows if m.ratio == 100), key=lambda m: m.median_s)[:3]
            assert all(m.mod_hash in at50 and db.best(workload_key=w.key, ratio=50)[0].median_s <= at50[m.mod_hash]
                       for m in top100)
        assert all(res.best_s for res in summary.results)
        res = measure_model(model, [50, 100], db, options=ModelOptions(rounds=2, min_repeat_ms=5, warmup_ms=5))
        assert {(r.ratio, r.variant) for r in res.rows} == {(r, v) for r in (50.0, 100.0)
                                                            for v in ("share-tuned", "whole-tuned", "untuned",
                                                                      "onnxruntime")}
        for row in res.rows:
            assert row.status == "ok", (row.variant, row.error)
            assert row.latency_s > 0 and row.granted_units == (1 if row.ratio == 50 else 2)
            if row.variant != "onnxruntime":
                assert row.rel_err is not None and row.rel_err < 1e-4
            else:  # ONNX Runtime's own threads may use the whole share, and no more
                assert row.detail["cores"] == row.granted_units, row.detail
                # as users run it: threads spinning (in a process of its own), what a variant is compared with
                assert row.detail["spinning"] and row.vendor_s == row.latency_s
        st = res.row(50, "share-tuned")
        assert st.tuned_tasks == st.n_tasks == len(tasks)  # every task had its own 50 % config, applied
        assert res.row(50, "untuned").tuned_tasks == 0
        assert st.trials == batch_each and set(st.detail["tasks"]) == {w.key for w in tasks}
        assert all(f["origin"] for f in st.detail["tasks"].values())  # where each task's kernel came from
        assert len(model_runs(db)) == 8
        report = compute_report(db)
        conv = next(w for w in tasks if w.name.startswith("fused_conv2d"))
        with Lookup(tmp_path / "db.sqlite", check_interval_s=None) as lk:  # a scheduler's view of one task
            hit = lk.lookup(conv.key, ratio=50)
            assert hit.found and hit.tuned_ratio == 50
            kernel = build_kernel(hit, db.workload(conv.key), lk.trace(hit))
        assert check_kernel(kernel) < 1e-4  # against its float64 reference
        exported = export_metaschedule(db, 50, tmp_path / "ms")
        assert {e["key"] for e in exported.exported} == {w.key for w in tasks}
    assert {(m.model, m.ratio) for m in report.models} == {("convnet", 50.0), ("convnet", 100.0)}


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("make, args, message", [
    (lambda d: None, ["workloads", "--from-onnx", "{d}/missing.onnx"], "no such ONNX file"),
    (lambda d: (d / "x.onnx").write_text("not a model"), ["workloads", "--from-onnx", "{d}/x.onnx"],
     "not an ONNX model"),
    (lambda d: dense_block(d / "m.onnx"), ["workloads", "--from-onnx", "{d}/m.onnx", "--shape", "x=4,a"],
     "--shape 'x=4,a'"),
    (lambda d: dense_block(d / "m.onnx"), ["workloads", "--from-onnx", "{d}/m.onnx"], "dynamic dimension"),
    (lambda d: dense_block(d / "m.onnx"), ["workloads", "--from-onnx", "{d}/m.onnx", "--shape", "z=1,16"],
     "no input of that name"),
    (lambda d: None, ["model", "{d}/missing.onnx"], "no such ONNX file"),
])
def test_bad_model_input_is_one_line_and_exit_2(tmp_path, make, args, message):
    make(tmp_path)
    p = run_cli(*[a.format(d=tmp_path) for a in args], "--db", tmp_path / "db.sqlite") if args[0] == "model" \
        else run_cli(*[a.format(d=tmp_path) for a in args])
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_bundles_carry_a_prim_task_and_its_reference(mlp_space, tmp_path):
    """A bundle's run host may have no compiler: the PrimFunc travels in the manifest, its float64
    reference as a library built on the CPU host; run and import on this host's cores."""
    from spatialtune.bundle.importer import import_results
    from spatialtune.bundle.manifest import load_manifest
    from spatialtune.bundle.run import RunOptions, run_bundle
    from spatialtune.terms import parse_condition

    r = run_cli("bundle", "build", "--space", mlp_space / "mlp.toml", "--workload", "fused_matmul_add_relu",
                "--candidates", "2", "--target", "cpu", "--build-workers", "1", "--out", tmp_path / "b", timeout=600)
    assert r.returncode == 0, r.stderr
    man = load_manifest(str(tmp_path / "b"))
    (entry,) = man["workloads"].values()
    assert entry["prim"]["script"] and (tmp_path / "b" / entry["reference_lib"]).is_file()
    shutil.copytree(tmp_path / "b", tmp_path / "moved")  # paths are the bundle's own
    res = run_bundle(str(tmp_path / "moved"), str(tmp_path / "res"), [parse_condition("cpu:100")],
                     RunOptions(repeat=1, min_repeat_ms=1))
    assert [m["status"] for m in res["measurements"]] == ["ok"] * len(res["measurements"]) != []
    with TuningDatabase(tmp_path / "db.sqlite") as db:
        import_results(str(tmp_path / "res"), db)
        (w,) = db.workloads()
        assert w.prim is not None and w.key == entry["key"]
