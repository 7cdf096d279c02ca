"""Winograd convolutions (models.winograd, ``--layout NCHW<b>c+winograd``): which convolutions take
it, that the model computes what ONNX Runtime computes (odd sizes, no padding, a residual and
ReLU fused into the output transform), and that the layout names parse."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

from spatialtune.errors import ConfigError
from spatialtune.models.importer import extract_workloads, load_onnx
from spatialtune.models.layout import parse_layout
from spatialtune.models.winograd import applies, matrices, out_tiles

from conftest import run_cli


def _w(rng, name, shape, scale=0.3):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def convs(path, c=8, h=7, w=9, pads=(1, 0), stride2=False):
    """x -> 3x3 conv (pad ``pads[0]``) + bias + ReLU -> 3x3 conv (pad ``pads[1]``) -> optionally a
    stride-2 3x3 conv; every channel count ``c`` or ``2c``. ``h`` x ``w`` leaves partial tiles."""
    rng = np.random.default_rng(7)
    p0, p1 = pads
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], kernel_shape=[3, 3], pads=[p0] * 4),
             helper.make_node("Relu", ["a"], ["a1"]),
             helper.make_node("Conv", ["a1", "w2"], ["y0"], kernel_shape=[3, 3], pads=[p1] * 4)]
    oh, ow = h + 2 * p0 - 2 + 2 * p1 - 2, w + 2 * p0 - 2 + 2 * p1 - 2
    inits = [_w(rng, "w1", (2 * c, c, 3, 3)), _w(rng, "b1", (2 * c,)), _w(rng, "w2", (c, 2 * c, 3, 3))]
    last = "y0"
    if stride2:
        nodes.append(helper.make_node("Conv", ["y0", "w3"], ["y"], kernel_shape=[3, 3], pads=[1] * 4, strides=[2, 2]))
        inits.append(_w(rng, "w3", (c, c, 3, 3)))
        oh, ow, last = (oh + 1) // 2, (ow + 1) // 2, "y"
    g = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, w])],
                          [helper.make_tensor_value_info(last, TensorProto.FLOAT, [1, c, oh, ow])], inits)
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_the_transform_matrices_compute_a_3x3_correlation_exactly():
    """F(4, 3) in one dimension: A^T [(G g) * (B^T d)] = the correlation of d with g, in float64."""
    a, b, g = matrices(4)
    rng = np.random.default_rng(0)
    d, k = rng.standard_normal(6), rng.standard_normal(3)
    want = np.array([d[i:i + 3] @ k for i in range(4)])
    np.testing.assert_allclose(a.T @ ((g @ k) * (b.T @ d)), want, rtol=1e-12, atol=1e-12)


def test_which_convolutions_take_it():
    assert applies((3, 3), (1, 1), (1, 1), 1)
    assert not applies((3, 3), (2, 2), (1, 1), 1)  # strided: the tiles would skip half their outputs
    assert not applies((1, 1), (1, 1), (1, 1), 1) and not applies((5, 5), (1, 1), (1, 1), 1)
    assert not applies((3, 3), (1, 1), (2, 2), 1) and not applies((3, 3), (1, 1), (1, 1), 8)
    assert out_tiles(7, 9, (1, 1, 1, 1)) == (7, 9, 2, 3) and out_tiles(56, 56, (1, 1, 1, 1)) == (56, 56, 14, 14)


def test_a_winograd_model_has_its_three_tasks_and_matches_onnx_runtime(tmp_path):
    """Partial tiles (7 x 9), a convolution without padding, bias and ReLU fused into the output
    transform; the strided convolution stays direct."""
    import onnxruntime as ort

    from spatialtune.models.e2e import random_feeds
    from test_onnx_fold import _run

    path = convs(tmp_path / "c.onnx", stride2=True)
    model = load_onnx(path, layout="NCHW8c+winograd")
    assert model.name == "c-NCHW8c-winograd" and model.layout == "NCHW8c+winograd"
    ws = {w.name: w for w in extract_workloads(model)}
    inputs = [n for n in ws if n.startswith("winograd_input")]
    matmuls = [n for n in ws if n.startswith("winograd_gemm")]
    outputs = [n for n in ws if "winograd_output" in n]
    assert len(inputs) == len(outputs) == 2 and len(matmuls) == 2, sorted(ws)
    assert any("winograd_output" in n and "relu" in n for n in outputs), sorted(ws)  # the epilogue fused
    assert sum("conv2d_NCHWc" in n for n in ws) == 1, sorted(ws)  # the stride-2 one
    assert all(ws[n].prim.weights == (1,) for n in matmuls), [ws[n].prim.weights for n in matmuls]
    feeds = random_feeds(model, 0)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = _run(model, feeds)[0]
    assert got.shape == want.shape
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_layout_names_with_winograd_parse_and_a_model_without_such_convolutions_keeps_its_name(tmp_path):
    assert parse_layout("NCHW16c+winograd") == 16 and parse_layout("NCHW8c+Winograd") == 8
    with pytest.raises(ConfigError, match=r"\+winograd goes with a blocked layout"):
        parse_layout("nchw+winograd")
    with pytest.raises(ConfigError, match="--layout"):
        parse_layout("NCHW16+winograd")
    rng = np.random.default_rng(1)  # a 1x1 convolution only: nothing for Winograd
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1])], "one",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])], [_w(rng, "w", (8, 8, 1, 1))])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "one.onnx")
    m = load_onnx(tmp_path / "one.onnx", layout="NCHW8c+winograd")
    assert m.name == "one-NCHW8c" and m.layout == "NCHW8c"
    r = run_cli("workloads", "--from-onnx", str(tmp_path / "one.onnx"), "--layout", "nchw+winograd")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "+winograd" in r.stderr, r.stderr


def test_auto_takes_winograd_only_for_convolutions_with_enough_tiles(tmp_path):
    """``auto``: a 24 x 24 image has 36 tiles of 4 x 4 (Winograd), a 7 x 9 one 6 (direct);
    an explicit blocked layout never takes it unless asked."""
    from spatialtune.models.layout import host_lanes
    from spatialtune.models.winograd import MIN_TILES

    lanes = host_lanes()
    assert 6 * 6 >= MIN_TILES > 2 * 3
    big = load_onnx(convs(tmp_path / "big.onnx", c=lanes, h=24, w=24, pads=(1, 1)))
    assert big.layout == f"NCHW{lanes}c+winograd" and big.name == f"big-NCHW{lanes}c-winograd"
    assert sum(w.name.startswith("winograd_gemm") for w in extract_workloads(big)) == 2
    small = load_onnx(convs(tmp_path / "small.onnx", c=lanes))
    assert small.layout == f"NCHW{lanes}c" and not any("winograd" in w.name for w in extract_workloads(small))
    direct = load_onnx(tmp_path / "big.onnx", layout=f"NCHW{lanes}c")
    assert direct.name == f"big-NCHW{lanes}c" and not any("winograd" in w.name for w in extract_workloads(direct))
