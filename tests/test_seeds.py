"""Register-tile seeds (search.seeds): their shapes, and that they are real kernels of the search."""
import numpy as np
import pytest

from spatialtune.device import detect_cpu, target_for
from spatialtune.measure.builder import BuildInput, LocalBuilder
from spatialtune.measure.runner import LocalRunner, RunInput, RunSettings
from spatialtune.partitions.cpu import CpuPartition
from spatialtune.search.cost_model import create_cost_model
from spatialtune.search.evolution import EvolutionConfig, EvolutionarySearch, SearchRun
from spatialtune.search.seeds import VectorUnit, broadcast_axis, register_tile_seeds, register_tiles, vector_unit
from spatialtune.search.space import candidate_from_trace
from spatialtune.search.uniform import UniformSampler
from spatialtune.workloads.schedule import apply_trace
from spatialtune.workloads.spec import Workload

TARGET = target_for(detect_cpu())
AVX2 = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}
DENSE = Workload(op="dense", dtype="fp32", params={"M": 16, "N": 32, "K": 24}, name="d")
QK = Workload(op="batch_matmul", dtype="fp32", params={"B": 2, "M": 8, "N": 32, "K": 16, "transpose_b": 1}, name="qk")
# an output row (W) that no whole AVX2 register of fp32 divides, as ResNet's 56 and 28 do for 16 lanes
CONV = Workload(op="conv2d", dtype="fp32", name="c",
                params={"N": 1, "C": 16, "H": 6, "W": 12, "K": 32, "R": 3, "S": 3, "stride": 1, "pad": 1})


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
    assert register_tiles(VectorUnit(256, 16), 32, cols=6, rows=5) == []  # not even a 128-bit vector of columns


def test_columns_no_whole_register_divides_take_the_widest_narrower_vector():
    tiles = register_tiles(VectorUnit(512, 32), 32, cols=56, rows=64)  # 56 = 7 x 8, never 16
    assert tiles and {nr for _, nr in tiles} == {8}
    assert all(14 <= mr <= 28 for mr, _ in tiles)  # still half to all of the free registers
    narrow = register_tiles(VectorUnit(256, 16), 32, cols=12, rows=8)
    assert narrow and all(nr % 4 == 0 and nr % 8 for _, nr in narrow)  # 128-bit vectors
    assert {nr % 16 for _, nr in register_tiles(VectorUnit(512, 32), 32, cols=64, rows=64)} == {0}  # whole when they fit


def test_the_rows_of_a_tile_run_along_the_axis_the_broadcast_operand_varies_on():
    # dense C[i, j] = A[i, k] W[j, k]: i; batched Q K^T: i, not the batch; NCHW conv: the output
    # channel, not the row above (an input vector feeds one FMA per output channel)
    assert [broadcast_axis(w.ir_module()) for w in (DENSE, QK, CONV)] == [0, 1, 1]


def test_convolution_seeds_tile_output_channels_by_pixels_with_the_window_inside():
    sampler = UniformSampler(CONV, AVX2, seed=3)
    seeds = register_tile_seeds(sampler.space, sampler.sample(24), 6, np.random.default_rng(0))
    assert len(seeds) >= 3
    allowed = register_tiles(VectorUnit(256, 16), 32, cols=12, rows=32)
    for c in seeds:
        n, k, y, x, rc, ry, rx = _tiles(c.trace, CONV)
        assert (k[-1], x[-1]) in allowed and n[-1] == y[-1] == 1, (k, x, y)
        assert ry == rx == [1, 3] and rc == [1, 16]


def _tiles(trace_json, w=DENSE):
    sch = apply_trace(w, trace_json)
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


@pytest.mark.parametrize("w", [DENSE, QK, CONV], ids=["dense", "qk", "conv"])
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


def test_a_failure_inside_metaschedules_evolution_costs_the_evolution_not_the_job(monkeypatch, caplog):
    s = _search(DENSE, AVX2, tile_seeds=0)
    first = s.ask(8)
    s.tell(first, [1e-3 * (i + 1) for i in range(len(first))])

    def failing(self):  # as TVM's parallel_for reports a check failing in one of its threads
        raise RuntimeError("parallel_for_dynamic error with Check failed: (args.size() == ...) is false")

    monkeypatch.setattr(type(s.strategy), "generate_measure_candidates", failing)
    got = s.ask(8)
    assert len(got) == 8 and not {c.mod_hash for c in got} & {c.mod_hash for c in first}
    assert any("evolution failed" in r.getMessage() for r in caplog.records)
    assert len(s.ask(4)) == 4  # and the next batches of the key sample without it
