"""Prefetches of a tiled reduction's next block (spatialtune.workloads.prefetch): placed before
the innermost reduction loop of a kernel tiled the way MetaSchedule tiles a CPU matmul, one per
cache line of the next block's rows that each reuse iteration owns, clamped to the buffer; the
kernel still computes the same thing; nothing is placed where the reduction is not split, on
another target, or when turned off."""
import re

import numpy as np
import pytest

M, N, K = 24, 64, 96


def matmul():
    from tvm import te

    a = te.placeholder((M, K), "float32", name="a")
    w = te.placeholder((K, N), "float32", name="w")
    k = te.reduce_axis((0, K), name="k")
    c = te.compute((M, N), lambda i, j: te.sum(a[i, k] * w[k, j], axis=k), name="c")
    return te.create_prim_func([a, w, c])


def tiled(ko=3, ri=4, lanes=16):
    """i, j, k tiled as SSRSRS: (i0, j0) k0 (i1, j1) k1 (i2, j2 vectorised); i1 reuses the
    weights' block (``ri`` iterations), k1 covers ``K // ko`` rows of it."""
    import tvm
    from tvm import s_tir

    sch = s_tir.Schedule(tvm.IRModule({"main": matmul()}))
    blk = sch.get_sblock("c")
    i, j, k = sch.get_loops(blk)
    i0, i1, i2 = sch.split(i, [None, ri, 2])
    j0, j1, j2 = sch.split(j, [None, 2, lanes])
    k0, k1 = sch.split(k, [ko, None])
    sch.reorder(i0, j0, k0, i1, j1, k1, i2, j2)
    sch.vectorize(j2)
    return sch.mod


def run(mod):
    import tvm

    lib = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    rng = np.random.default_rng(0)
    a, w = rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((K, N)).astype(np.float32)
    out = tvm.runtime.tensor(np.full((M, N), np.nan, np.float32))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(w), out)
    return out.numpy(), a.astype(np.float64) @ w.astype(np.float64), lib


def test_prefetches_the_next_block_and_computes_the_same():
    from spatialtune.workloads.prefetch import rewrite

    mod, n = rewrite(tiled())
    # k1 = 32 rows per block over ri = 4 reuse iterations: 8 rows each; the register tile's
    # row is 16 float32 = one 64-byte line: 8 prefetches of the weights (the activations are
    # not read a vector at a time)
    assert n == 8
    text = mod.script()
    assert text.count("T.prefetch") == 8 and text.count("T.address_of(w[") == 8
    assert "T.min(k_0 + 1, 2)" in text  # the last block prefetches itself, not past the end
    got, ref, lib = run(mod)
    assert np.allclose(got, ref, rtol=1e-4, atol=1e-4)
    asm = lib.mod.inspect_source("asm")
    assert re.search(r"\bprefetcht0\b", asm), "no prefetch instruction in the kernel"


def test_wider_tiles_and_blocks():
    from spatialtune.workloads.prefetch import rewrite

    # 2 reuse iterations over 48 rows: 24 rows x (32 lanes = 2 lines) = 48 prefetches
    assert rewrite(tiled(ko=2, ri=2, lanes=32))[1] == 48
    # one reuse iteration: every row of a 96-row block, 192 prefetches, over the cap: none
    assert rewrite(tiled(ko=1, ri=1, lanes=32))[1] == 0


def test_nothing_without_a_split_reduction_elsewhere_or_turned_off(monkeypatch):
    import tvm

    from spatialtune.workloads.prefetch import before_compile, rewrite

    plain = tvm.IRModule({"main": matmul()})
    assert rewrite(plain)[1] == 0
    mod = tiled()
    assert before_compile(mod, {"kind": "cuda"}) is mod
    assert "T.prefetch" in before_compile(mod, {"kind": "llvm"}).script()
    monkeypatch.setenv("SPATIALTUNE_PREFETCH", "0")
    assert rewrite(mod)[1] == 0


@pytest.mark.parametrize("fast", [False, True])
def test_builder_builds_what_it_measures(tmp_path, fast):
    """The tuner's build worker function compiles the rewritten module (the kernel it exports
    has the prefetches) and it still matches the reference."""
    import tvm

    from spatialtune.measure.builder import build_one

    res = build_one(tvm.ir.save_json(tiled()), {"kind": "llvm"}, str(tmp_path), "k", fast)
    lib = tvm.runtime.load_module(res["artifact"])
    rng = np.random.default_rng(1)
    a, w = rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((K, N)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((M, N), np.float32))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(w), out)
    assert np.allclose(out.numpy(), a.astype(np.float64) @ w, rtol=1e-4, atol=1e-4)
