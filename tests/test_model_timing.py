"""End-to-end timing that holds and where the time goes: a small conv + dense model tuned at 100 %
only (a few trials), then run at 50 % and 100 %, every variant loaded once and timed in
interleaved rounds, identical variants timed once; and ``--profile``'s per-task breakdown next to
ONNX Runtime's profiler."""
import json

import numpy as np
import pytest

from spatialtune.models.profile import Breakdown, match_nodes
from spatialtune.store.database import TuningDatabase
from spatialtune.tuning import TuneOptions, tune

from conftest import run_cli
from test_models import QUICK, conv_dense_model

FAST = dict(min_repeat_ms=1, warmup_ms=1)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The model, and a database with its tasks tuned at 100 % only."""
    from spatialtune.models.importer import extract_workloads, load_onnx

    d = tmp_path_factory.mktemp("timing")
    model = conv_dense_model(d / "convnet.onnx")
    tasks = extract_workloads(load_onnx(model))
    with TuningDatabase(d / "db.sqlite") as db:
        tune(tasks, [100], db, TuneOptions(trials=2 * len(tasks), scheduler="gradient", **QUICK))
    return model, d / "db.sqlite", tasks


def test_variants_are_timed_interleaved_in_rounds_and_identical_ones_once(tuned, monkeypatch):
    from spatialtune.models import e2e

    model, db_path, tasks = tuned
    slots = []
    real_call = e2e._call

    def spy(w, opt, fn, *args):
        if fn.endswith(":time_slot"):
            slots.append(args[0])
        return real_call(w, opt, fn, *args)

    monkeypatch.setattr(e2e, "_call", spy)
    pauses = []
    real_settle = e2e._settle
    monkeypatch.setattr(e2e, "_settle", lambda: (pauses.append(len(slots)), real_settle()))
    with TuningDatabase(db_path) as db:
        res = e2e.measure_model(model, [50, 100], db, options=e2e.ModelOptions(rounds=3, **FAST))
    for row in res.rows:
        assert row.status == "ok", (row.ratio, row.variant, row.error)
        assert len(row.times) == 3 and row.latency_s == float(np.median(row.times))
    # 100 %: the share's configs are the 100 % ones, so whole-tuned is share-tuned's kernels;
    # 50 %: no task has a 50 % config, so share-tuned is the untuned model
    same = {(r.ratio, r.variant): r.detail.get("same_as") for r in res.rows}
    assert same == {(100.0, "onnxruntime"): None, (100.0, "share-tuned"): None, (100.0, "whole-tuned"): "share-tuned",
                    (100.0, "untuned"): None, (50.0, "onnxruntime"): None, (50.0, "share-tuned"): None,
                    (50.0, "whole-tuned"): None, (50.0, "untuned"): "share-tuned"}
    assert res.row(100, "whole-tuned").times == res.row(100, "share-tuned").times
    assert res.row(50, "untuned").times == res.row(50, "share-tuned").times
    assert res.row(100, "share-tuned").tuned_tasks == len(tasks) and res.row(50, "share-tuned").tuned_tasks == 0
    assert res.row(50, "whole-tuned").tuned_tasks == len(tasks)
    # round-robin, three variants timed per share, each once per round: A B C, A B C, A B C
    assert slots == ["onnxruntime", "share-tuned", "untuned"] * 3 + ["onnxruntime", "share-tuned", "whole-tuned"] * 3
    # ONNX Runtime runs in a process of its own: a pause before each slot that changes process
    # (ORT -> TVM and TVM -> ORT), never between two TVM variants
    changes = [i for i in range(1, 9) if (slots[i] == "onnxruntime") != (slots[i - 1] == "onnxruntime")]
    assert pauses == [0, *changes, 9, *(9 + c for c in changes)]
    ort = res.row(100, "onnxruntime")
    assert ort.detail["spinning"] and ort.vendor_s == ort.latency_s
    from spatialtune.cli.model import format_model

    assert "ok (same kernels as share-tuned: timed once)" in format_model(res)


def test_profile_maps_every_onnxruntime_node_and_the_times_add_up(tuned, tmp_path):
    import onnxruntime as ort

    from spatialtune.cli.model import format_model
    from spatialtune.models.e2e import ModelOptions, measure_model
    from spatialtune.store.model_runs import model_runs

    model, db_path, tasks = tuned
    with TuningDatabase(db_path) as db:
        res = measure_model(model, [100], db, options=ModelOptions(rounds=2, profile=True, **FAST))
        bd = res.profiles[100.0]
        st = res.row(100, "share-tuned")
        stored = next(m for m in model_runs(db, latest=True) if m.variant == "share-tuned" and m.ratio == 100)
        assert Breakdown.from_dict(stored.detail["profile"]) == bd  # for a report to show
        best = {w.key: db.best(workload_key=w.key, ratio=100)[0].median_s for w in tasks}
    # TVM: every task at weight x its 100 % kernel time from the database; the rest is outside
    assert {t.key for t in bd.tasks} == {w.key for w in tasks}
    for t in bd.tasks:
        assert t.tvm_s == pytest.approx(t.weight * best[t.key])
    assert bd.tvm_total_s == st.latency_s
    assert sum(t.tvm_s for t in bd.tasks) + bd.outside.tvm_s == pytest.approx(bd.tvm_total_s)
    assert sum(t.ort_s for t in bd.tasks) + bd.outside.ort_s == pytest.approx(bd.ort_total_s)
    # ONNX Runtime: every node of its optimized graph is in exactly one place
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    import onnx

    graph_ops = sorted(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    placed = [n for t in [*bd.tasks, bd.outside] for n in t.ort_nodes]  # "name (op)"; ORT names unnamed nodes
    assert len(set(placed)) == len(placed) and sorted(n.rsplit(" (", 1)[1][:-1] for n in placed) == graph_ops
    # by operator and order: the convolution to the conv task, each Gemm to a matmul task
    ops = {t.name: [n.rsplit(" (", 1)[1][:-1] for n in t.ort_nodes] for t in bd.tasks}
    conv = next(o for name, o in ops.items() if name.startswith("fused_conv2d"))
    assert "Conv" in conv or "FusedConv" in conv
    assert set(conv) <= {"Conv", "FusedConv", "Add", "Relu"}, ops
    matmuls = [o for name, o in ops.items() if "matmul" in name]
    assert len(matmuls) == 2 and all(len(o) == 1 and o[0] in ("Gemm", "FusedGemm", "MatMul") for o in matmuls), ops
    # inside the model: every task's kernels timed as the compiled model called them (the VM's
    # instrument hook, a run of its own), adding up with the VM's own time to that run's total
    # (the reshape task is no kernel in the compiled model: Relax turns it into a view of its input)
    assert bd.in_model_total_s > 0 and all(t.in_model_s > 0 for t in bd.tasks if "reshape" not in t.name)
    assert next(t for t in bd.tasks if "reshape" in t.name).in_model_s == 0
    assert sum(t.in_model_s for t in bd.tasks) + bd.outside.in_model_s == pytest.approx(bd.in_model_total_s)
    assert all(t.vs_ort == pytest.approx(t.in_model_s / t.ort_s) for t in bd.tasks if t.ort_s > 0)
    text = format_model(res)
    assert "outside tuned kernels" in text and "TVM in model" in text and all(t.name in text for t in bd.tasks)


def test_the_profile_sets_kernels_inside_the_model_against_onnxruntime():
    from spatialtune.cli.model import format_profile
    from spatialtune.models.profile import breakdown

    facts = {"a": {"name": "fused_conv2d_add", "weight": 2, "time_s": 1e-3},
             "b": {"name": "fused_matmul", "weight": 1, "time_s": 3e-3}}
    ort = {"nodes": [{"name": "c1", "op": "Conv", "time_s": 1.3e-3}, {"name": "c2", "op": "Conv", "time_s": 1.3e-3},
                     {"name": "m", "op": "MatMul", "time_s": 2.5e-3}], "total_s": 7.0e-3}
    inside = {"functions": {"fused_conv2d_add": {"calls": 2, "time_s": 3.0e-3},  # 1.5 ms a call in the model
                            "fused_matmul": {"calls": 1, "time_s": 2.1e-3},
                            "vm.builtin.alloc_storage": {"calls": 3, "time_s": 0.1e-3}}, "total_s": 5.4e-3}
    calls = ["a", "a", "b"]
    alone = breakdown(100, calls, facts, 4.5e-3, ort)
    bd = breakdown(100, calls, facts, 4.5e-3, ort, inside, {"fused_conv2d_add": "a", "fused_matmul": "b"})
    # by the tuner's times the convolution is ahead of ORT's and the matmul loses; in the model the reverse
    assert alone.loser().key == "b" and alone.outside.in_model_s is None
    conv, mm = (next(t for t in bd.tasks if t.key == k) for k in "ab")
    assert (conv.tvm_s, conv.in_model_s, mm.in_model_s) == pytest.approx((2e-3, 3e-3, 2.1e-3))
    assert bd.loser().key == "a" and conv.vs_ort == pytest.approx(3.0 / 2.6)
    assert bd.outside.in_model_s == pytest.approx(5.4e-3 - 5.1e-3)  # the VM's own calls and the rest
    assert Breakdown.from_dict(bd.to_dict()) == bd
    text = format_profile(bd)
    assert "TVM in model" in text and "loses most: fused_conv2d_add" in text
    assert "TVM in model" not in format_profile(alone)


def test_nodes_are_matched_in_order_one_heavy_operator_per_call():
    calls = ["fused_conv2d_add_relu", "reshape1", "fused_matmul_add1_relu1", "fused_matmul1_add2"]
    assert match_nodes(["Conv", "ReorderOutput", "Flatten", "FusedGemm", "Gemm"], calls) == [0, None, 1, 2, 3]
    # unfused: the epilogue nodes follow their matmul into its call; a second matmul opens the next
    assert match_nodes(["MatMul", "Add", "Relu", "MatMul", "Add", "Softmax"],
                       ["fused_matmul_add_relu", "fused_matmul1_add1"]) == [0, 0, 0, 1, 1, None]
    # never back: a matmul after the last matmul call is outside, not a second one in it
    assert match_nodes(["MatMul", "MatMul"], ["fused_matmul_add"]) == [0, None]
    # ORT's SiLU (its QuickGelu fusion of x * sigmoid(x)) belongs to the convolution it follows
    assert match_nodes(["Conv", "QuickGelu", "GlobalAveragePool", "Mul"],
                       ["fused_conv2d_NCHWc_add_tir_sigmoid_multiply", "mean", "multiply2"]) == [0, 0, 1, 2]
    assert match_nodes(["Add"], []) == [None]


def test_matmuls_and_convolutions_are_matched_by_what_they_compute_where_the_orders_differ():
    """An attention block: ONNX Runtime ran the V projection after the softmax, TVM's model makes it
    beside Q and K. Kept in order, the scores' matmul went to a projection call and the V projection
    to the scores' task; by family and output size every node goes to its own task."""
    nodes = ["Gemm", "Transpose", "Gemm", "FusedMatMul", "Softmax", "Gemm", "MatMul", "Gemm", "Add",
             "SkipLayerNormalization", "Gemm", "Mul", "Erf", "Add", "Mul", "Mul"]
    sizes = [98304, 98304, 98304, 196608, 196608, 98304, 98304, 98304, 98304, 98304, 393216, 393216, 393216,
             393216, 393216, 393216]
    calls = ["fused_matmul_add", "fused_reshape_transpose", "fused_matmul_add", "fused_matmul_add",
             "fused_matmul1_multiply", "softmax", "matmul2", "fused_matmul_add_add1", "layer_norm",
             "fused_matmul3_add2_multiply1_erf_add3_multiply2_multiply3"]
    call_sizes = [(98304,), (98304,), (98304,), (98304,), (196608,), (196608,), (98304,), (98304,), (98304,),
                  (393216,)]
    in_order = match_nodes(nodes, calls)
    assert in_order[3] == 3 and in_order[5] == 4  # the scores to a projection, V's projection to the scores
    got = match_nodes(nodes, calls, sizes, call_sizes)
    assert got == [0, 1, 2, 4, 5, 3, 6, 7, 7, 8, 9, 9, 9, 9, 9, 9]
    # a heavy node whose size matches no call still goes to a call of its family, in order
    assert match_nodes(["Conv", "Relu"], ["fused_conv2d_add_relu"], [10, 10], [(12,)]) == [0, 0]
    assert match_nodes(["MatMul"], ["fused_conv2d_add"], [4], [(4,)]) == [None]  # never across families
    # in order, by time where the times are known: a layer norm rather than the reshapes after it
    light = (["Reshape", "SkipLayerNormalization", "Reshape"], ["fused_transpose2_reshape1", "layer_norm"])
    assert match_nodes(*light) == [0, None, 0]
    assert match_nodes(*light, weights=[5e-6, 500e-6, 5e-6]) == [0, 1, None]


@pytest.mark.parametrize("args, message", [
    (["--profile"], "--profile: no task of m has a tuned config at 100%"),
    (["--rounds", "0"], "--rounds must be at least 1"),
])
def test_bad_model_options_are_one_line_and_exit_2(tmp_path, args, message):
    from test_models import dense_block

    dense_block(tmp_path / "m.onnx")
    p = run_cli("model", tmp_path / "m.onnx", "--shape", "x=4,16", *args, "--db", tmp_path / "db.sqlite")
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_the_json_rows_carry_the_profile(tuned):
    model, db_path, _ = tuned
    p = run_cli("model", model, "--ratios", "100", "--rounds", "1", "--min-repeat-ms", "1", "--profile", "--json",
                "--db", db_path)
    assert p.returncode == 0, p.stderr
    rows = {r["variant"]: r for r in json.loads(p.stdout)}
    prof = Breakdown.from_dict(rows["share-tuned"]["detail"]["profile"])
    assert prof.tvm_total_s == rows["share-tuned"]["latency_s"] and len(rows["onnxruntime"]["times"]) == 1
