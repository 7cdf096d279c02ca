"""spatialtune's own schedule rules on a CPU target, for real: the packed-panel design space, the
transposed-tile spaces of a layout transform and the broadcast-vector space of an element-wise block."""
import pytest

from spatialtune.device import detect_cpu, target_for
from spatialtune.measure.builder import BuildInput, LocalBuilder
from spatialtune.measure.runner import LocalRunner, RunInput, RunSettings
from spatialtune.partitions.cpu import CpuPartition
from spatialtune.search.space import DesignSpace, candidate_from_trace
from spatialtune.search.uniform import UniformSampler
from spatialtune.workloads.spec import Workload

TARGET = target_for(detect_cpu())
DENSE = Workload(op="dense", dtype="fp32", params={"M": 16, "N": 32, "K": 24}, name="d")
QK = Workload(op="batch_matmul", dtype="fp32", params={"B": 2, "M": 8, "N": 32, "K": 16, "transpose_b": 1}, name="qk")


def _packed(space):
    return [s for s in space.spaces if "transform_layout" in str(s.trace)]


@pytest.mark.parametrize("w", [DENSE, QK], ids=["dense", "qk"])
def test_the_transposed_operand_gets_a_packed_space_beside_metaschedules_own(w):
    with_panels, without = DesignSpace(w, TARGET), DesignSpace(w, TARGET, pack_panels=False)
    assert not _packed(without)
    assert len(_packed(with_panels)) == len(without.spaces) == len(with_panels.spaces) // 2
    copy = "W_global" if w is DENSE else "B_global"  # the operand's packed copy
    assert all(copy in s.mod.script() for s in _packed(with_panels))


@pytest.mark.parametrize("w", [
    Workload(op="matmul", dtype="fp32", params={"M": 16, "N": 32, "K": 24}, name="m"),  # B[K, N]: already contiguous
    Workload(op="batch_matmul", dtype="fp32", params={"B": 2, "M": 8, "N": 32, "K": 16, "transpose_b": 0}, name="b"),
    Workload(op="dense", dtype="fp32", params={"M": 16, "N": 24, "K": 24}, name="d24"),  # 24 columns: no whole panels
    Workload(op="conv2d", dtype="fp32", params=dict(N=1, C=4, H=9, W=9, K=32, R=3, S=3, stride=1, pad=1), name="c"),
], ids=["matmul", "bmm", "dense-24", "conv2d"])
def test_operands_that_need_no_panels_get_none(w):
    assert not _packed(DesignSpace(w, TARGET))


def test_a_packed_kernel_replays_builds_and_matches_numpy(tmp_path):
    """What the search proposes from the packed space is a real kernel: its trace replays to the
    same kernel (the database stores traces), and its output matches the float64 reference."""
    cands = [c for c in UniformSampler(DENSE, TARGET, seed=3).sample(12) if "TransformLayout" in c.trace]
    assert cands, "no packed kernel in 12 uniform samples of a space that is half packed"
    again = [candidate_from_trace(DENSE, c.trace, "best", expect_hash=c.mod_hash) for c in cands[:3]]
    assert all(a is not None for a in again)
    res = _build_and_run(DENSE, cands[:3], tmp_path)
    assert all(x.status == "ok" and x.rel_err < 1e-5 for x in res), [(x.status, x.error) for x in res]


def _build_and_run(w: Workload, cands, tmp_path):
    """``cands`` built (each must build) and run at 100 %: the runner's results, output checked."""
    with LocalBuilder(tmp_path, workers=2) as b:
        built = b.build([BuildInput(c.mod_json, c.mod_hash) for c in cands], TARGET)
    assert all(x.ok for x in built), [x.error for x in built]
    part = CpuPartition()
    with LocalRunner(part, settings=RunSettings(repeat=2, min_repeat_ms=1, timeout=60)) as r:
        return r.run(part.grant(100), "none", [RunInput(w.to_dict(), x.artifact) for x in built])


def _transform(name: str, src: tuple[int, ...], dst: tuple[int, ...], read: str, write: str) -> Workload:
    """A layout transform as Relax legalizes one in a model (a loop per axis of the source, the
    destination indexed by them), ``read``/``write``: the two buffers' indices in ``v0``, ``v1``, ..."""
    from spatialtune.workloads.prim import prim_task

    dims = lambda shape: ", ".join(f"T.int64({d})" for d in shape)  # noqa: E731
    v = ", ".join(f"v{i}" for i in range(len(src)))
    i = ", ".join(f"i{i}" for i in range(len(src)))
    script = f"""
# from tvm.script import ir as I
# from tvm.script import tirx as T

@I.ir_module
class Module:
    @T.prim_func(s_tir=True)
    def main(x: T.Buffer(({dims(src)}), "float32"), y: T.Buffer(({dims(dst)}), "float32")):
        T.func_attr({{"op_pattern": 8, "tirx.noalias": True}})
        for {i} in T.grid({dims(src)}):
            with T.sblock("te_layout_transform"):
                {v} = T.axis.remap("{"S" * len(src)}", [{i}])
                T.reads(x[{read}])
                T.writes(y[{write}])
                y[{write}] = x[{read}]
"""
    return Workload.from_prim(prim_task(script, name), name=name)


# NCHW -> NCHW8c and back, as a model blocked by 8 channels starts and ends
TO_BLOCKED = _transform("to_blocked", (1, 16, 6, 12), (1, 2, 6, 12, 8), "v0, v1, v2, v3",
                        "v0, v1 // T.int64(8), v2, v3, v1 % T.int64(8)")
FROM_BLOCKED = _transform("from_blocked", (1, 2, 6, 12, 8), (1, 16, 6, 12), "v0, v1, v2, v3, v4",
                          "v0, v1 * T.int64(8) + v4, v2, v3")


def _transposed(space):
    return [s for s in space.spaces if "sch.unroll(" in str(s.trace) and "sch.vectorize(" in str(s.trace)]


@pytest.mark.parametrize("w,loops", [(TO_BLOCKED, (3, 1)), (FROM_BLOCKED, (4, 3))], ids=["to-blocked", "from-blocked"])
def test_a_layout_transform_gets_two_transposed_tile_spaces(w, loops):
    import tvm

    from spatialtune.search.rules import transpose_loops

    space = DesignSpace(w, TARGET)
    assert len(space.spaces) == 3 and len(_transposed(space)) == 2
    # (the loop of the read's innermost axis, the write's): to blocked W and C, back c and W
    sch = tvm.s_tir.Schedule(w.ir_module())
    (block,) = sch.get_child_blocks(sch.get_sblock("root"))
    assert transpose_loops(sch, block) == loops


@pytest.mark.parametrize("w", [
    Workload(op="conv2d", dtype="fp32", params=dict(N=1, C=4, H=9, W=9, K=32, R=3, S=3, stride=1, pad=1), name="c"),
    _transform("copy", (1, 2, 6, 12), (1, 2, 6, 12), "v0, v1, v2, v3", "v0, v1, v2, v3"),  # nothing transposed
    _transform("one_pixel", (1, 16, 6, 1), (1, 6, 1, 16), "v0, v1, v2, v3", "v0, v2, v3, v1"),  # W of one pixel
], ids=["conv2d", "copy", "single-pixel"])
def test_blocks_that_transpose_nothing_get_no_tile_space(w):
    assert not _transposed(DesignSpace(w, TARGET))


@pytest.mark.parametrize("w", [TO_BLOCKED, FROM_BLOCKED], ids=["to-blocked", "from-blocked"])
def test_transposed_tile_kernels_replay_build_and_match_numpy(w, tmp_path):
    cands = [c for c in UniformSampler(w, TARGET, seed=1).sample(16) if "Unroll" in c.trace]
    assert cands, "no transposed-tile kernel in 16 uniform samples of a space that is two thirds of them"
    assert all(candidate_from_trace(w, c.trace, "best", expect_hash=c.mod_hash) for c in cands[:3])
    res = _build_and_run(w, cands[:3], tmp_path)
    assert all(x.status == "ok" and x.rel_err == 0 for x in res), [(x.status, x.error, x.rel_err) for x in res]


def _binary(name: str, shape: tuple[int, ...], other: tuple[int, ...], index: str) -> Workload:
    """``y = x * s`` over ``shape``, ``s`` of shape ``other`` indexed by ``index`` (in ``v0``, ...)."""
    from spatialtune.workloads.prim import prim_task

    dims = lambda s: ", ".join(f"T.int64({d})" for d in s)  # noqa: E731
    v = ", ".join(f"v{i}" for i in range(len(shape)))
    i = ", ".join(f"i{i}" for i in range(len(shape)))
    script = f"""
# from tvm.script import ir as I
# from tvm.script import tirx as T

@I.ir_module
class Module:
    @T.prim_func(s_tir=True)
    def main(x: T.Buffer(({dims(shape)}), "float32"), s: T.Buffer(({dims(other)}), "float32"),
             y: T.Buffer(({dims(shape)}), "float32")):
        T.func_attr({{"op_pattern": 0, "tirx.noalias": True}})
        for {i} in T.grid({dims(shape)}):
            with T.sblock("T_multiply"):
                {v} = T.axis.remap("{"S" * len(shape)}", [{i}])
                T.reads(x[{v}], s[{index}])
                T.writes(y[{v}])
                y[{v}] = x[{v}] * s[{index}]
"""
    return Workload.from_prim(prim_task(script, name), name=name)


# a squeeze-and-excitation's scale in NCHW8c: every pixel of a channel block times its 8 scales
SE_SCALE = _binary("se_scale", (1, 2, 6, 12, 8), (1, 2, 1, 1, 8), "v0, v1, T.int64(0), T.int64(0), v4")


def _broadcast(space):
    return [s for s in space.spaces if "sch.vectorize(" in str(s.trace) and "sch.unroll(" in str(s.trace)]


def test_a_broadcast_over_a_short_inner_axis_gets_a_space_that_vectorises_that_axis_alone():
    import tvm

    from spatialtune.search.rules import broadcast_inner

    space = DesignSpace(SE_SCALE, TARGET)
    assert len(space.spaces) == 2 and len(_broadcast(space)) == 1
    sch = tvm.s_tir.Schedule(SE_SCALE.ir_module())
    (block,) = sch.get_child_blocks(sch.get_sblock("root"))
    assert broadcast_inner(sch, block)


@pytest.mark.parametrize("w", [
    _binary("same_shape", (1, 2, 6, 12, 8), (1, 2, 6, 12, 8), "v0, v1, v2, v3, v4"),  # nothing broadcast
    _binary("long_inner", (2, 6, 128), (1, 1, 128), "T.int64(0), T.int64(0), v2"),  # a row of 128: one vector loop
    _binary("per_pixel", (1, 2, 6, 12, 8), (1, 1, 6, 12, 1), "T.int64(0), T.int64(0), v2, v3, T.int64(0)"),
], ids=["same-shape", "long-inner-axis", "not-by-the-inner-axis"])
def test_element_wise_blocks_without_a_short_broadcast_inner_axis_get_no_extra_space(w):
    assert not _broadcast(DesignSpace(w, TARGET))


def test_broadcast_vector_kernels_replay_build_and_match_numpy(tmp_path):
    cands = [c for c in UniformSampler(SE_SCALE, TARGET, seed=1).sample(16) if "Unroll" in c.trace]
    assert cands, "no broadcast-vector kernel in 16 uniform samples of a space that is half of them"
    assert all(candidate_from_trace(SE_SCALE, c.trace, "best", expect_hash=c.mod_hash) for c in cands[:3])
    res = _build_and_run(SE_SCALE, cands[:3], tmp_path)  # float32 products against the float64 reference
    assert all(x.status == "ok" and x.rel_err < 1e-6 for x in res), [(x.status, x.error, x.rel_err) for x in res]


def _mean(name: str, shape: tuple[int, ...], axes: tuple[int, ...]) -> Workload:
    """The mean of ``x`` over ``axes`` (kept as 1s), as Relax legalizes one: a sum block, then a divide."""
    from spatialtune.workloads.prim import prim_task

    dims = lambda s: ", ".join(f"T.int64({d})" for d in s)  # noqa: E731
    out = tuple(1 if i in axes else d for i, d in enumerate(shape))
    n = len(shape)
    sp = [f"v{i}" for i in range(n)]
    rd = [f"r{i}" for i in axes]
    read = ", ".join(f"r{i}" if i in axes else f"v{i}" for i in range(n))
    loops = ", ".join([f"i{i}" for i in range(n)] + [f"k{i}" for i in axes])
    extents = dims(out) + ", " + dims([shape[i] for i in axes])
    count = 1
    for i in axes:
        count *= shape[i]
    script = f"""
# from tvm.script import ir as I
# from tvm.script import tirx as T

@I.ir_module
class Module:
    @T.prim_func(s_tir=True)
    def main(x: T.Buffer(({dims(shape)}), "float32"), y: T.Buffer(({dims(out)}), "float32")):
        T.func_attr({{"op_pattern": 4, "tirx.noalias": True}})
        red = T.sblock_alloc_buffer(({dims(out)}))
        for {loops} in T.grid({extents}):
            with T.sblock("red"):
                {", ".join(sp + rd)} = T.axis.remap("{"S" * n + "R" * len(axes)}", [{loops}])
                T.reads(x[{read}])
                T.writes(red[{", ".join(sp)}])
                with T.init():
                    red[{", ".join(sp)}] = T.float32(0.0)
                red[{", ".join(sp)}] = red[{", ".join(sp)}] + x[{read}]
        for {", ".join(f"i{i}" for i in range(n))} in T.grid({dims(out)}):
            with T.sblock("divide"):
                {", ".join(sp)} = T.axis.remap("{"S" * n}", [{", ".join(f"i{i}" for i in range(n))}])
                T.reads(red[{", ".join(sp)}])
                T.writes(y[{", ".join(sp)}])
                y[{", ".join(sp)}] = red[{", ".join(sp)}] / T.float32({float(count)})
"""
    return Workload.from_prim(prim_task(script, name), name=name)


# a squeeze-and-excitation's pooling in NCHW8c: the mean of each channel block's pixels
SE_POOL = _mean("se_pool", (1, 2, 6, 12, 8), (2, 3))


def _rfactor_vectors(space):
    return [s for s in space.spaces if "set_scope" in str(s.trace) and "sch.unroll(" in str(s.trace)]


def test_a_pooling_that_keeps_a_short_inner_axis_gets_a_space_of_vector_partial_sums():
    import tvm

    from spatialtune.search.rules import kept_inner_reduction

    assert len(_rfactor_vectors(DesignSpace(SE_POOL, TARGET))) == 1
    sch = tvm.s_tir.Schedule(SE_POOL.ir_module())
    assert kept_inner_reduction(sch, sch.get_sblock("red")) == 5  # five kept axes, the last one innermost


@pytest.mark.parametrize("w", [
    _mean("row_mean", (4, 6, 64), (2,)),  # the reduced axis is the innermost one
    _mean("long_inner", (2, 6, 128), (1,)),  # a kept row of 128: MetaSchedule's spaces vectorise it
    DENSE,  # two operands
], ids=["inner-axis-reduced", "long-inner-axis", "dense"])
def test_other_reductions_get_no_partial_sum_vector_space(w):
    assert not _rfactor_vectors(DesignSpace(w, TARGET))


def test_partial_sum_vector_kernels_replay_build_and_match_numpy(tmp_path):
    cands = [c for c in UniformSampler(SE_POOL, TARGET, seed=1).sample(24) if "SetScope" in c.trace]
    assert cands, "no partial-sum vector kernel in 24 uniform samples of a space that is a quarter of them"
    assert all(candidate_from_trace(SE_POOL, c.trace, "best", expect_hash=c.mod_hash) for c in cands[:3])
    res = _build_and_run(SE_POOL, cands[:3], tmp_path)  # float32 sums against the float64 reference
    assert all(x.status == "ok" and x.rel_err < 1e-5 for x in res), [(x.status, x.error, x.rel_err) for x in res]
