"""Register-tile seeds (search.seeds): their shapes, and that they are real kernels of the search."""
import numpy as np
import pytest

from spatialtune.device import detect_cpu, target_for
from spatialtune.measure.builder import BuildInput, LocalBuilder
from spatialtune.measure.runner import LocalRunner, RunInput, RunSettings
from spatialtune.partitions.cpu import CpuPartition
from spatialtune.search.cost_model import create_cost_model
from spatialtune.search.evolution import EvolutionConfig, EvolutionarySearch, SearchRun
from spatialtune.search.seeds import VectorUnit, register_tile_seeds, register_tiles, vector_unit
from spatialtune.search.space import candidate_from_trace
from spatialtune.search.uniform import UniformSampler
from spatialtune.workloads.schedule import apply_trace
from spatialtune.workloads.spec import Workload

TARGET = target_for(detect_cpu())
AVX2 = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}
DENSE = Workload(op="dense", dtype="fp32", params={"M": 16, "N": 32, "K": 24}, name="d")


def test_the_vector_unit_comes_from_the_target():
    assert vector_unit(AVX2) == VectorUnit(256, 16)
    assert vector_unit({"kind": "llvm", "mcpu": "sapphirerapids"}) == VectorUnit(512, 32)
    assert vector_unit({"kind": "cuda", "arch": "sm_90"}) is None


def test_register_tiles_fill_between_half_and_all_of_the_free_registers():
    for unit in (VectorUnit(256, 16), VectorUnit(512, 32)):
        lanes, budget = unit.bits // 32, unit.registers - 4
        tiles = register_tiles(unit, 32, cols=2304, rows=128)
        assert tiles
        for mr, nr in tiles:
            acc = mr * nr // lanes
            assert nr % lanes == 0 and 2304 % nr == 0 and 128 % mr == 0
            assert budget / 2 <= acc <= budget
    assert (4, 16) in register_tiles(VectorUnit(256, 16), 32, cols=2304, rows=128)  # BLIS's Zen kernel is 6x16
    assert register_tiles(VectorUnit(256, 16), 32, cols=12, rows=5) == []  # no whole vector of columns


def _tiles(trace_json):
    sch = apply_trace(DENSE, trace_json)
    tr = sch.trace
    return [[int(x) for x in tr.decisions[i]] for i in tr.insts if i.kind.name == "SamplePerfectTile"]


def test_seeds_take_a_register_tile_and_a_long_inner_reduction():
    sampler = UniformSampler(DENSE, AVX2, seed=1)
    seeds = register_tile_seeds(sampler.space, sampler.sample(24), 8, np.random.default_rng(0))
    assert len(seeds) >= 4
    assert len({c.mod_hash for c in seeds}) == len(seeds)
    allowed = register_tiles(VectorUnit(256, 16), 32, cols=32, rows=16)
    for c in seeds:
        rows, cols, k = _tiles(c.trace)
        assert (rows[-1], cols[-1]) in allowed
        assert k == [1, 24]  # 24, the only divisor of K in 16..64
        assert c.source == "seed-tile"


def _search(w, target, seeds=(), **config):
    return EvolutionarySearch(w, target, create_cost_model("xgb"), run=SearchRun(batch=8, threads=1), seeds=seeds,
                              config=EvolutionConfig(population=32, genetic_iters=1, **config))


def test_a_fresh_cpu_search_measures_register_tile_seeds_first():
    s = _search(DENSE, AVX2)
    first = s.ask(8)
    assert sum(c.source == "seed-tile" for c in first) == 3  # half of what is left after exploration
    s.tell(first, [1e-3] * len(first))
    assert not [c for c in _search(DENSE, AVX2, tile_seeds=0).ask(8) if c.source == "seed-tile"]


def test_a_share_seeded_from_other_shares_gets_no_register_tile_seeds():
    donor = UniformSampler(DENSE, AVX2, seed=2).sample(2)
    s = _search(DENSE, AVX2, seeds=[(c.trace, 1e-3) for c in donor])
    assert not [c for c in s.ask(8) if c.source == "seed-tile"]


@pytest.mark.parametrize("w", [DENSE, Workload(op="batch_matmul", dtype="fp32",
                                               params={"B": 2, "M": 8, "N": 32, "K": 16, "transpose_b": 1}, name="qk")],
                         ids=["dense", "qk"])
def test_seed_kernels_replay_build_and_match_numpy(w, tmp_path):
    sampler = UniformSampler(w, TARGET, seed=4)
    seeds = register_tile_seeds(sampler.space, sampler.sample(16), 3, np.random.default_rng(1))
    assert seeds
    assert all(candidate_from_trace(w, c.trace, "best", expect_hash=c.mod_hash) is not None for c in seeds)
    with LocalBuilder(tmp_path, workers=2) as b:
        built = b.build([BuildInput(c.mod_json, c.mod_hash) for c in seeds], TARGET)
    assert all(x.ok for x in built), [x.error for x in built]
    part = CpuPartition()
    with LocalRunner(part, settings=RunSettings(repeat=2, min_repeat_ms=1, timeout=60)) as r:
        res = r.run(part.grant(100), "none", [RunInput(w.to_dict(), x.artifact) for x in built])
    assert all(x.status == "ok" and x.rel_err < 1e-5 for x in res), [(x.status, x.error) for x in res]
