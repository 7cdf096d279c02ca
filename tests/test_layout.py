"""Blocked channel layouts for a model's convolutions (models.layout): a CNN block compiled with
NCHW<b>c convolutions is tuned, run and matches ONNX Runtime; grouped convolutions stay NCHW."""
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


def cnn_block(path, c=8, e=16):
    """An inverted-residual block: 1x1 expand (c -> e) + relu, 3x3 depthwise + relu, 1x1 project
    (e -> c), residual add."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "we", "be"], ["a"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["a"], ["a1"]),
             helper.make_node("Conv", ["a1", "wd", "bd"], ["d"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=e),
             helper.make_node("Relu", ["d"], ["d1"]),
             helper.make_node("Conv", ["d1", "wp", "bp"], ["p"], kernel_shape=[1, 1]),
             helper.make_node("Add", ["p", "x"], ["y"])]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 6, 6])],
                          [_w(rng, "we", (e, c, 1, 1)), _w(rng, "be", (e,)), _w(rng, "wd", (e, 1, 3, 3)),
                           _w(rng, "bd", (e,)), _w(rng, "wp", (c, e, 1, 1)), _w(rng, "bp", (c,))])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
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
    depthwise = load_onnx(cnn_block(tmp_path / "m.onnx"))  # a grouped convolution: it stays NCHW
    assert depthwise.layout == "nchw" and depthwise.name == "m"
    assert load_onnx(tmp_path / "p.onnx", layout="nchw").name == "p"


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
    assert len(blocked) == 2, sorted(names)  # the expand and the project
    assert any("conv2d" in n and "NCHWc" not in n for n in names)  # the depthwise one, in NCHW
    assert any("layout_transform" in n for n in names)  # counted in the model's time as tasks
    # a block that does not divide both channel counts of a convolution (8 here) leaves it NCHW,
    # and then nothing needs a layout transform
    wide = {w.name for w in extract_workloads(load_onnx(path, layout="NCHW16c"))}
    assert not [n for n in wide if "NCHWc" in n or "layout_transform" in n], sorted(wide)


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
