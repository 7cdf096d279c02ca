"""spatialtune's own schedule rules: the packed-panel design space on a CPU target, for real."""
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
    with LocalBuilder(tmp_path, workers=2) as b:
        built = b.build([BuildInput(c.mod_json, c.mod_hash) for c in cands[:3]], TARGET)
    assert all(x.ok for x in built), [x.error for x in built]
    part = CpuPartition()
    with LocalRunner(part, settings=RunSettings(repeat=2, min_repeat_ms=1, timeout=60)) as r:
        res = r.run(part.grant(100), "none", [RunInput(DENSE.to_dict(), x.artifact) for x in built])
    assert all(x.status == "ok" and x.rel_err < 1e-5 for x in res), [(x.status, x.error) for x in res]
