"""Inference rewrites of the ONNX graph before import (models.onnx_fold): a BatchNormalization
after a convolution is folded into its weights, as ONNX Runtime folds it, and the model still
computes what ONNX Runtime computes; where folding would not be exact it is left alone."""
import numpy as np
from onnx import TensorProto, helper, numpy_helper, save

from spatialtune.models.e2e import compile_model, random_feeds
from spatialtune.models.importer import extract_workloads, load_onnx


def conv_bn(path, bias=True, second_reader=False):
    rng = np.random.default_rng(5)
    t = lambda n, s, lo=-1, hi=1: numpy_helper.from_array(rng.uniform(lo, hi, s).astype(np.float32), n)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w", "cb"] if bias else ["x", "w"], ["a"], kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["a", "s", "b", "m", "v"], ["bn"], epsilon=1e-3),
             helper.make_node("Relu", ["bn"], ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])]
    if second_reader:  # the convolution's output is read twice: folding would change the other reader
        nodes.append(helper.make_node("Relu", ["a"], ["z"]))
        outs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8, 6, 6]))
    g = helper.make_graph(nodes, "cbn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])], outs,
                          [t("w", (8, 4, 3, 3)), t("cb", (8,)), t("s", (8,)), t("b", (8,)), t("m", (8,)),
                           t("v", (8,), 0.5, 2.0)])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _run(model, feeds):
    import tvm
    from tvm import relax

    ex, _ = compile_model(model, {"kind": "llvm"})
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(feeds[n]) for n, _, _ in model.inputs])
    return [o.numpy() for o in out] if isinstance(out, (list, tuple)) or type(out).__name__ in ("Array", "Tuple") \
        else [out.numpy()]


def test_a_batch_norm_after_a_convolution_is_folded_into_it_and_the_outputs_match_onnx_runtime(tmp_path):
    import onnxruntime as ort

    for bias in (True, False):
        path = conv_bn(tmp_path / f"m{bias}.onnx", bias=bias)
        model = load_onnx(path, layout="nchw")
        names = [w.name for w in extract_workloads(model)]
        assert names == ["fused_conv2d_add_relu"], names  # one task: the normalization is in the weights
        feeds = random_feeds(model, 0)
        want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
        got = _run(model, feeds)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)


def test_a_convolution_read_by_more_than_the_batch_norm_is_not_folded(tmp_path):
    model = load_onnx(conv_bn(tmp_path / "m.onnx", second_reader=True), layout="nchw")
    assert any("batch_norm" in w.name for w in extract_workloads(model))
