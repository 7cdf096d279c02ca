"""Blocked channel layouts for a model's convolutions (models.layout): a CNN block compiled with
NCHW<b>c convolutions, its depthwise one and ReLU6 included, is tuned, run and matches ONNX
Runtime; other grouped convolutions stay NCHW."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

from spatialtune.errors import ConfigError
from spatialtune.measure.runner import RunSettings
from spatialtune.models.e2e import ModelOptions, measure_model
from spatialtune.models.importer import extract_workloads, load_onnx, space_from_onnx
from spatialtune.models.layout import host_lanes, parse_layout
from spatialtune.store.database import TuningDatabase
from spatialtune.tuning import TuneOptions, tune

from conftest import run_cli


def _w(rng, name, shape, scale=0.3):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def cnn_block(path, c=8, e=16, groups=None):
    """An inverted-residual block: 1x1 expand (c -> e) + relu, 3x3 depthwise (``groups`` e, or
    as given) + relu6 (an ONNX Clip), 1x1 project (e -> c), residual add."""
    rng = np.random.default_rng(3)
    g = groups or e
    six = [numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32), "hi")]
    nodes = [helper.make_node("Conv", ["x", "we", "be"], ["a"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["a"], ["a1"]),
             helper.make_node("Conv", ["a1", "wd", "bd"], ["d"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=g),
             helper.make_node("Clip", ["d", "lo", "hi"], ["d1"]),
             helper.make_node("Conv", ["d1", "wp", "bp"], ["p"], kernel_shape=[1, 1]),
             helper.make_node("Add", ["p", "x"], ["y"])]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 6, 6])],
                              [_w(rng, "we", (e, c, 1, 1)), _w(rng, "be", (e,)), _w(rng, "wd", (e, e // g, 3, 3)),
                               _w(rng, "bd", (e,)), _w(rng, "wp", (c, e, 1, 1)), _w(rng, "bp", (c,)), *six])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def plain_block(path, c=16):
    """A residual pair of 3x3 convolutions, every channel count a multiple of 16."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["a1"]),
             helper.make_node("Conv", ["a1", "w2"], ["b"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["b", "x"], ["y"])]
    g = helper.make_graph(nodes, "plain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 6, 6])],
                          [_w(rng, "w1", (2 * c, c, 3, 3)), _w(rng, "w2", (c, 2 * c, 3, 3))])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_auto_blocks_by_the_vector_width_only_when_every_convolution_takes_it(tmp_path):
    lanes = host_lanes()
    blocked = load_onnx(plain_block(tmp_path / "p.onnx"))  # auto is the default
    assert blocked.layout == f"NCHW{lanes}c" and blocked.name == f"p-NCHW{lanes}c"
    names = [w.name for w in extract_workloads(blocked)]
    assert sum("NCHWc" in n for n in names) == 2 and sum("layout_transform" in n for n in names) == 2, names
    # a depthwise convolution whose channels the block divides takes it too, and the ReLU6 after
    # it follows the layout: the block's only layout transforms are its input's and its output's
    mobile = load_onnx(cnn_block(tmp_path / "m.onnx", c=lanes, e=2 * lanes))
    assert mobile.layout == f"NCHW{lanes}c", mobile.layout
    names = [w.name for w in extract_workloads(mobile)]
    assert sum("NCHWc" in n for n in names) == 3 and sum("layout_transform" in n for n in names) == 2, names
    assert any(n.startswith("fused_depthwise_conv2d_NCHWc") and "maximum_minimum" in n for n in names), names
    # another grouped convolution (2 groups): no blocked kernel takes it, so the model stays NCHW
    grouped = load_onnx(cnn_block(tmp_path / "g.onnx", c=lanes, e=2 * lanes, groups=2))
    assert grouped.layout == "nchw" and grouped.name == "g"
    assert load_onnx(tmp_path / "p.onnx", layout="nchw").name == "p"


def test_relu6_is_lifted_to_relax_operators_and_other_calls_are_left_alone(tmp_path):
    from spatialtune.models.layout import lift_scalar_elementwise

    mod = load_onnx(cnn_block(tmp_path / "m.onnx"), layout="nchw").relax_mod
    before = mod["main"].script()
    assert "call_tir(maximum" in before.replace("R.", "") and "call_tir(minimum" in before.replace("R.", "")
    after = lift_scalar_elementwise(mod)["main"].script()
    assert "R.maximum(" in after and "R.minimum(" in after and "call_tir(maximum" not in after.replace("R.", "")
    assert after.count("call_tir(") == before.count("call_tir(") - 2  # the two bounds, nothing else


def test_layout_names_parse_and_bad_ones_are_one_line(tmp_path):
    assert parse_layout(None) is None and parse_layout("nchw") is None and parse_layout("NCHW16c") == 16
    assert parse_layout("auto") == host_lanes() in (4, 8, 16)
    for bad in ("nhwc", "NCHW1c", "NCHWc", "NCHW16"):
        with pytest.raises(ConfigError, match="--layout"):
            parse_layout(bad)
    r = run_cli("workloads", "--from-onnx", str(cnn_block(tmp_path / "m.onnx")), "--layout", "NCHW0c")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--layout" in r.stderr, r.stderr


def test_blocked_convolutions_only_where_the_block_divides_and_never_grouped(tmp_path):
    path = cnn_block(tmp_path / "m.onnx")
    names = {w.name: w for w in extract_workloads(load_onnx(path, layout="NCHW8c"))}
    blocked = [n for n in names if "NCHWc" in n]
    assert len(blocked) == 3, sorted(names)  # the expand, the depthwise and the project
    assert sum("layout_transform" in n for n in names) == 2, sorted(names)  # counted in the model's time as tasks
    # a block that does not divide a convolution's channel counts (8 here) leaves it NCHW: only the
    # depthwise one (16 channels) takes NCHW16c, with a layout transform on each side
    wide = {w.name for w in extract_workloads(load_onnx(path, layout="NCHW16c"))}
    assert [n.startswith("fused_depthwise_conv2d_NCHWc") for n in wide if "NCHWc" in n] == [True], sorted(wide)
    assert sum("conv2d" in n and "NCHWc" not in n for n in wide) == 2, sorted(wide)
    grouped = {w.name for w in extract_workloads(load_onnx(cnn_block(tmp_path / "g.onnx", groups=2),
                                                           layout="NCHW8c"))}
    assert sum("NCHWc" in n for n in grouped) == 2, sorted(grouped)  # two groups: that one stays NCHW


def test_a_blocked_model_is_tuned_run_and_matches_onnx_runtime(tmp_path):
    path = cnn_block(tmp_path / "m.onnx")
    text, ws = space_from_onnx([path], layout="NCHW8c")
    assert {w.model for w in ws} == {"m-NCHW8c"}
    opts = TuneOptions(trials=len(ws), batch=1, population=16, genetic_iters=1, baselines=False, confirm_top=0,
                       search_threads=1, run=RunSettings(repeat=2, min_repeat_ms=2, warmup_ms=2))
    with TuningDatabase(tmp_path / "l.sqlite") as db:
        tune(ws, [100], db, opts)
        res = measure_model(path, [100], db, options=ModelOptions(rounds=1, min_repeat_ms=1, warmup_ms=1,
                                                                   layout="NCHW8c"))
    assert res.model.name == "m-NCHW8c" and res.model.layout == "NCHW8c"
    rows = {r.variant: r for r in res.rows}
    assert all(r.status == "ok" for r in rows.values()), [(r.variant, r.status, r.error) for r in rows.values()]
    st = rows["share-tuned"]
    assert st.tuned_tasks == st.n_tasks == len(ws) and st.rel_err < 1e-4


def test_a_hard_swish_follows_the_blocked_layout_and_the_model_still_matches_onnx_runtime(tmp_path):
    """HardSigmoid imports as a Relax clip, which has no layout rule: rewritten as a maximum and a
    minimum it stays in the blocked layout, fused after the depthwise convolution."""
    import onnxruntime as ort

    from spatialtune.models.e2e import random_feeds
    from test_onnx_fold import _run

    lanes = host_lanes()
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "wd"], ["d"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=lanes),
             helper.make_node("HardSigmoid", ["d"], ["h"]), helper.make_node("Mul", ["d", "h"], ["s"]),
             helper.make_node("Conv", ["s", "wp"], ["y"], kernel_shape=[1, 1])]
    g = helper.make_graph(nodes, "hs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, lanes, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, lanes, 6, 6])],
                          [_w(rng, "wd", (lanes, 1, 3, 3), 2.0), _w(rng, "wp", (lanes, lanes, 1, 1))])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "hs.onnx")
    model = load_onnx(tmp_path / "hs.onnx")
    names = [w.name for w in extract_workloads(model)]
    assert model.layout == f"NCHW{lanes}c" and sum("layout_transform" in n for n in names) == 2, names
    assert any(n.startswith("fused_depthwise_conv2d_NCHWc") and "maximum_minimum" in n for n in names), names
    feeds = random_feeds(model, 0)
    want = ort.InferenceSession(str(tmp_path / "hs.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(_run(model, feeds)[0], want[0], rtol=1e-4, atol=1e-5)


def test_auto_takes_the_vector_width_else_half_of_it_and_ignores_single_pixel_convolutions():
    from spatialtune.models.layout import auto_block

    resnet = [(64, 64, 1, 3136), (64, 256, 1, 3136)]
    mobile = [(24, 144, 1, 3136), (144, 144, 1, 3136), (144, 24, 1, 3136)]  # 24 and 144: 8 divides, 16 not
    squeeze = [(144, 6, 1, 1), (6, 144, 1, 1)]  # a squeeze-and-excitation's convolutions: one pixel each
    assert auto_block(resnet, 16) == 16 and auto_block(mobile, 16) == 8 and auto_block(mobile + squeeze, 16) == 8
    assert auto_block(resnet + squeeze, 16) == 16 and auto_block(mobile, 8) == 8
    assert auto_block([(12, 20, 1, 100)], 16) is None and auto_block([(12, 20, 1, 100)], 8) == 4
    assert auto_block(resnet + [(64, 64, 2, 3136)], 16) is None  # two groups, no blocked kernel: NCHW
    assert auto_block(resnet + [(64, 64, 0, 0)], 16) is None  # a convolution of unknown shape
    assert auto_block([], 16) is None and auto_block([(6, 10, 1, 100)], 4) is None  # no block under 4


def test_a_model_without_convolutions_keeps_its_name_and_layout_in_any_layout(tmp_path):
    rng = np.random.default_rng(5)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], [_w(rng, "w", (8, 8))])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "mm.onnx")
    for text in ("NCHW8c", "NCHW16c+winograd", "auto"):
        model = load_onnx(tmp_path / "mm.onnx", layout=text)
        assert (model.name, model.layout) == ("mm", "nchw"), (text, model.name, model.layout)
