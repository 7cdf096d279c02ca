"""A carried model's inputs and weights, drawn from a seed the same way on every host.

A GPU host may have little room for files, and a model's weights are most of its size (a BERT
layer's are tens of MiB), while its latency does not depend on their values. So a bundle carries,
for each large weight, only its shape, dtype, mean and standard deviation, and both hosts draw it
from the seed: the CPU host to compute the reference outputs, the GPU host to run the model. The
draws use numpy's legacy ``RandomState``, whose streams numpy keeps fixed across versions (a
``Generator``'s may change), so two hosts with different numpy versions draw the same numbers.

A spec is a list of ``{"name", "shape", "dtype"}`` (inputs) or the same with ``"mean"`` and
``"std"`` (weights), as the manifest holds them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

WEIGHT_SEED_OFFSET = 1  # the weights' stream is another than the inputs', so one never shifts the other


def random_inputs(spec: Sequence[dict], seed: int) -> list[np.ndarray]:
    """Floats uniform in [-1, 1]; integer inputs zero (token ids, indices: always in range)."""
    rs = np.random.RandomState(seed)
    out = []
    for s in spec:
        dt, shape = np.dtype(s["dtype"]), tuple(s["shape"])
        out.append(rs.uniform(-1, 1, size=shape).astype(dt) if dt.kind == "f" else np.zeros(shape, dtype=dt))
    return out


def drawn_weights(spec: Sequence[dict], seed: int) -> list[np.ndarray]:
    """Each weight normal with its recorded mean and standard deviation (a constant where that is 0)."""
    rs = np.random.RandomState(seed + WEIGHT_SEED_OFFSET)
    out = []
    for s in spec:
        dt, shape = np.dtype(s["dtype"]), tuple(s["shape"])
        a = rs.standard_normal(size=shape) * float(s.get("std") or 0.0) + float(s.get("mean") or 0.0)
        out.append(a.astype(dt) if dt.kind == "f" else np.rint(a).astype(dt))
    return out


def weight_spec(name: str, value: np.ndarray) -> dict:
    """What the manifest records of a weight it does not carry."""
    v = np.asarray(value)
    x = v.astype(np.float64)
    return {"name": name, "shape": list(v.shape), "dtype": str(v.dtype), "mean": float(x.mean()) if v.size else 0.0,
            "std": float(x.std()) if v.size else 0.0}


def sample(a: np.ndarray, stride: int) -> np.ndarray:
    """Every ``stride``-th element of ``a`` flattened: what a reference output is kept as when the
    whole array would be too large to carry."""
    return np.ascontiguousarray(np.asarray(a).reshape(-1)[::max(1, int(stride))])
