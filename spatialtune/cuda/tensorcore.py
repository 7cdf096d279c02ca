"""What building tensor-core kernels takes: which CUDA targets get them, the pass config their
build needs, and how to see the MMA instructions in what was built.

Plain strings and dicts, no TVM import: the builder worker (:mod:`spatialtune.measure.builder`)
and the design space (:mod:`spatialtune.search.tensorcore`) both read them.
"""

from __future__ import annotations

import re

TENSOR_CORE_MIN_SM = 80
"""Tensor-core spaces from sm_80 on: the ``mma`` kernels load with ``ldmatrix`` and pipeline with
``cp.async`` (sm_80), and the GPU rounds run on sm_80 and sm_90."""

TENSOR_CORE_PASS_CONFIG = {"tirx.disable_storage_rewrite": True}
"""TVM 0.27's StorageRewrite lets a ``wmma`` kernel's float32 output tile reuse the shared memory
of its float16 operand tiles once they are dead; the typed pointer ``wmma_store`` takes to that
memory then fails lowering (``tvm_access_ptr element type must match the source buffer``) and
most ``wmma`` candidates would not build. Without the rewrite each tile keeps its own buffer."""

# Calls that only a tensorized module contains (wmma fragments, mma.sync, ldmatrix).
_TENSOR_CORE_CALLS = ("tvm_load_matrix_sync", "tvm_mma_sync", "tvm_store_matrix_sync", "ptx_mma", "ptx_ldmatrix")

# Tensor-core instructions as PTX spells them: wmma (sm_70+), mma.sync (sm_80+ here), wgmma (sm_90a).
_PTX_MMA = re.compile(r"\b(wmma\.mma\.sync|mma\.sync|wgmma\.mma_async)\b")


def cuda_sm(target) -> int | None:
    """The SM number of a CUDA target (a dict or a ``tvm.target.Target``): 80 for ``sm_80``, 90
    for ``sm_90a``; None without an arch."""
    arch = target.get("arch", "") if isinstance(target, dict) else target.attrs.get("arch", "")
    try:
        return int(str(arch or "").removeprefix("sm_").rstrip("af"))
    except ValueError:
        return None


def build_pass_config(mod_json: str, target: dict) -> dict:
    """The PassContext config a scheduled module needs to build: :data:`TENSOR_CORE_PASS_CONFIG`
    for a CUDA module with tensor-core calls, nothing otherwise (every other kernel keeps
    StorageRewrite)."""
    if target.get("kind") != "cuda" or not any(c in mod_json for c in _TENSOR_CORE_CALLS):
        return {}
    return dict(TENSOR_CORE_PASS_CONFIG)


def ptx_mma_instructions(ptx: str) -> dict[str, int]:
    """How many tensor-core instructions of each kind a PTX text holds (``wmma.mma.sync``,
    ``mma.sync``, ``wgmma.mma_async``); empty for a kernel on the CUDA cores only."""
    out: dict[str, int] = {}
    for m in _PTX_MMA.finditer(ptx):
        out[m.group(1)] = out.get(m.group(1), 0) + 1
    return out
