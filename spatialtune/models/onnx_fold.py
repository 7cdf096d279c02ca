"""Inference-time rewrites of an ONNX graph before TVM imports it, as ONNX Runtime makes them.

A BatchNormalization after a convolution is, at inference, a per-output-channel scale and shift:
folded into the convolution's weights and bias it costs nothing. TVM's importer keeps it as a
``batch_norm`` the fusion pass leaves as a task of its own (a pass over the activations the
convolution has just written), and Relax's own ``FoldBatchnormToConv2D`` segfaulted on the graph
TVM's ONNX importer writes. ONNX Runtime folds it in its graph optimizer, so a model compiled here
is compared with one that does not pay for it.
"""

from __future__ import annotations

import numpy as np


def fold_batch_norms(model):
    """``model`` (an ``onnx.ModelProto``, changed in place) with every inference-mode
    BatchNormalization folded into the Conv before it where that is exact: the convolution's
    weights (and bias, if any) and the four normalization tensors are initializers, the
    convolution's output is read by the normalization alone, and the normalization has one
    output. Returns how many it folded."""
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    readers: dict[str, int] = {}
    for n in g.node:
        for x in n.input:
            readers[x] = readers.get(x, 0) + 1
    outputs = {o.name for o in g.output}
    producer = {o: n for n in g.node for o in n.output}
    folded, drop = 0, []
    for bn in list(g.node):
        conv = producer.get(bn.input[0]) if bn.op_type == "BatchNormalization" else None
        if conv is None or conv.op_type != "Conv" or not _foldable(bn, conv, inits, readers, outputs):
            continue
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] \
            else np.zeros(w.shape[0])
        s, beta, mean, var = (numpy_helper.to_array(inits[x]).astype(np.float64) for x in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        k = s / np.sqrt(var + eps)
        dt = numpy_helper.to_array(inits[conv.input[1]]).dtype
        wn, bname = f"{conv.name or conv.output[0]}_bn_w", f"{conv.name or conv.output[0]}_bn_b"
        g.initializer.append(numpy_helper.from_array((w * k.reshape(-1, *[1] * (w.ndim - 1))).astype(dt), wn))
        g.initializer.append(numpy_helper.from_array(((b - mean) * k + beta).astype(dt), bname))
        del conv.input[1:]
        conv.input.extend([wn, bname])
        conv.output[0] = bn.output[0]
        drop.append(bn)
        folded += 1
    for bn in drop:
        g.node.remove(bn)
    return folded


def _foldable(bn, conv, inits: dict, readers: dict, outputs: set) -> bool:
    training = next((a.i for a in bn.attribute if a.name == "training_mode"), 0)
    consts = [conv.input[1], *bn.input[1:5]] + ([conv.input[2]] if len(conv.input) > 2 and conv.input[2] else [])
    return (not training and len([o for o in bn.output if o]) == 1 and len(bn.input) == 5
            and all(c in inits for c in consts) and readers.get(conv.output[0], 0) == 1
            and conv.output[0] not in outputs)
