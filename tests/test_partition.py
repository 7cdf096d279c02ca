import os

import pytest

from spatialtune.errors import ConfigError
from spatialtune.partitions import create_partition
from spatialtune.partitions.cpu import CpuPartition
from spatialtune.terms import parse_ratios
from spatialtune.measure.worker import Worker

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_ratios_round_to_whole_cores_at_least_one():
    p = CpuPartition(cores=list(range(8)))
    assert [p.grant(r).units for r in (100, 50, 25, 12.5, 10, 1)] == [8, 4, 2, 1, 1, 1]
    s = p.grant(25)
    assert s.cores == (0, 1) and s.fraction == 0.25 and s.unit == "core"
    assert p.grant(30).units == 2  # 2.4 cores -> 2
    two = CpuPartition(cores=[4, 7])
    assert two.grant(50).cores == (4,) and two.grant(100).cores == (4, 7)


def test_neighbour_gets_the_rest():
    p = CpuPartition(cores=[0, 1, 2, 3])
    rest = p.neighbour_share(p.grant(25))
    assert rest.cores == (1, 2, 3) and rest.units == 3
    assert p.neighbour_share(p.grant(100)) is None


def test_parse_ratios():
    assert parse_ratios("25,50,100") == [100.0, 50.0, 25.0]
    assert parse_ratios("12.5%, 100") == [100.0, 12.5]
    for bad in ("0", "101", "abc", "", "-5", "nan"):
        with pytest.raises(ConfigError):
            parse_ratios(bad)


def test_unknown_partition_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="cpu, mps, green"):
        create_partition("mig")


def test_worker_applies_the_core_set_and_thread_count():
    """The real cap, applied where measurements run: a worker process holding one share."""
    p = CpuPartition()
    share = p.grant(50)
    env = dict(os.environ) | p.worker_env(share)
    env["PYTHONPATH"] = TESTS + os.pathsep + env.get("PYTHONPATH", "")
    with Worker(init="spatialtune.measure.in_worker:init_measure_worker", init_args=("cpu", share, "cpu"), env=env) as w:
        assert w.init_result == share.units
        assert w.call("workerfns:affinity") == list(share.cores)
        assert w.call("workerfns:getenv", "TVM_NUM_THREADS") == str(share.units)
    assert sorted(os.sched_getaffinity(0)) == p.cores  # the parent is untouched
