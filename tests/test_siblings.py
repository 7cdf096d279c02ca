"""Sibling tasks (search.siblings): found from the IR, kernels carried over with their register
tiles, and measured first in a model's later tasks."""
import numpy as np

from spatialtune.device import detect_cpu, target_for
from spatialtune.measure.builder import BuildInput, LocalBuilder
from spatialtune.measure.runner import LocalRunner, RunInput, RunSettings
from spatialtune.partitions.cpu import CpuPartition
from spatialtune.search.seeds import register_tile_seeds
from spatialtune.search.siblings import adapt, refit, signature
from spatialtune.search.space import DesignSpace
from spatialtune.search.uniform import UniformSampler
from spatialtune.store.database import TuningDatabase
from spatialtune.tuning import TuneOptions, tune
from spatialtune.workloads.schedule import apply_trace, mod_hash
from spatialtune.workloads.spec import Workload

TARGET = target_for(detect_cpu())


def conv(name, C, H, K, R, pad):
    return Workload(op="conv2d", dtype="fp32", name=name, model="m",
                    params={"N": 1, "C": C, "H": H, "W": H, "K": K, "R": R, "S": R, "stride": 1, "pad": pad})


C1 = conv("c1", 16, 8, 32, 1, 0)
C1B = conv("c1b", 32, 12, 16, 1, 0)  # other channels and pixels: the same computation
C3 = conv("c3", 16, 8, 32, 3, 1)  # another window: another family
DENSE = Workload(op="dense", dtype="fp32", params={"M": 16, "N": 32, "K": 24}, name="d")


def test_refit_keeps_the_inner_factors_that_divide_and_moves_the_rest_out():
    assert refit([2, 4, 2, 8], 128) == [2, 4, 2, 8]
    assert refit([2, 4, 2, 8], 64) == [1, 4, 2, 8]
    assert refit([1, 4, 2, 8], 56) == [7, 1, 1, 8]  # 8 divides 56; 2 and 4 do not divide 7
    assert refit([1, 3], 1) == [1, 1]  # a 3x3 window on a 1x1 convolution
    for f, e in (([1, 2, 16, 4], 96), ([3, 1, 1, 7], 10), ([1, 64], 48)):
        out = refit(f, e)
        assert len(out) == len(f) and int(np.prod(out)) == e


def test_siblings_are_found_from_the_ir_not_the_names_or_shapes():
    assert signature(C1.ir_module()) == signature(C1B.ir_module()) is not None
    assert signature(C3.ir_module()) != signature(C1.ir_module())
    assert signature(DENSE.ir_module()) != signature(C1.ir_module())
    other = Workload(op="dense", dtype="fp32", params={"M": 8, "N": 48, "K": 40}, name="x")
    assert signature(other.ir_module()) == signature(DENSE.ir_module())


def test_a_sibling_kernel_keeps_its_register_tile_builds_and_matches_numpy(tmp_path):
    sampler = UniformSampler(C1, TARGET, seed=5)
    donors = register_tile_seeds(sampler.space, sampler.sample(16), 3, np.random.default_rng(2))
    assert donors
    space = DesignSpace(C1B, TARGET)
    got = [adapt(space, C1, d.trace) for d in donors]
    assert all(s is not None for s in got)

    def tiles(trace):
        return [[int(x) for x in trace.decisions[i]] for i in trace.insts if i.kind.name == "SamplePerfectTile"]

    for d, s in zip(donors, got):
        before, after = tiles(apply_trace(C1, d.trace).trace), tiles(s.trace)
        # output channels (32 -> 16) and pixels (8 -> 12) keep their innermost tile where it divides
        for b, a, extent in zip(before[1:4], after[1:4], (16, 12, 12)):
            assert a[-1] == b[-1] if extent % b[-1] == 0 else a[-1] < b[-1], (before, after)
            assert int(np.prod(a)) == extent
    cands = [space.candidate(s, "sibling") for s in got]
    with LocalBuilder(tmp_path, workers=2) as b:
        built = b.build([BuildInput(c.mod_json, c.mod_hash) for c in cands], TARGET)
    assert all(x.ok for x in built), [x.error for x in built]
    part = CpuPartition()
    with LocalRunner(part, settings=RunSettings(repeat=2, min_repeat_ms=1, timeout=60)) as r:
        res = r.run(part.grant(100), "none", [RunInput(C1B.to_dict(), x.artifact) for x in built])
    assert all(x.status == "ok" and x.rel_err < 1e-5 for x in res), [(x.status, x.error) for x in res]


def test_a_models_later_task_measures_its_siblings_best_kernels_first(tmp_path):
    opts = TuneOptions(trials=16, batch=4, scheduler="gradient", population=16, genetic_iters=1, confirm_top=0,
                       baselines=False, search_threads=1, run=RunSettings(repeat=2, min_repeat_ms=2))
    with TuningDatabase(tmp_path / "s.sqlite") as db:
        tune([C1, C1B, C3], [100], db, opts)
        rows = db.measurements()
    assert not [m for m in rows if m.workload_key == C3.key and m.source == "sibling"]  # no sibling
    by = {w.key: sorted((m for m in rows if m.workload_key == w.key), key=lambda m: m.id) for w in (C1, C1B)}
    first, later = sorted(by.values(), key=lambda ms: ms[0].id)
    assert not [m for m in first if m.source == "sibling"]  # nothing measured yet to carry over
    sib = [m for m in later if m.source == "sibling"]
    assert sib and all(m.status == "ok" for m in sib), [(m.status, m.error) for m in sib]
    assert {m.id for m in sib} <= {m.id for m in later[:len(sib) + 2]}  # in its first batch
    donors = {m.mod_hash for m in first}
    assert not donors & {m.mod_hash for m in sib}  # adapted kernels, not the donors' own modules
    assert len({mod_hash(apply_trace(next(w for w in (C1, C1B) if w.key == m.workload_key), m.trace).mod)
                for m in sib}) == len(sib)
