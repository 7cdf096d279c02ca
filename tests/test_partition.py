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


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to hold one back")
def test_every_thread_of_a_measuring_worker_stays_on_the_share():
    """The threads that run kernels and the baseline, not just the main thread: a BLAS whose pool
    starts at import (numpy's OpenBLAS, here told to start two threads) has its threads moved to
    the share's cores too, and the TVM thread count matches the share."""
    p = CpuPartition()
    share = p.grant(100 / len(p.cores))  # one core
    env = dict(os.environ) | p.worker_env(share) | {"OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}
    env["PYTHONPATH"] = TESTS + os.pathsep + env.get("PYTHONPATH", "")
    with Worker(init="spatialtune.measure.in_worker:init_measure_worker", init_args=("cpu", share, "cpu"),
                env=env) as w:
        assert w.init_result == share.units == 1
        w.call("workerfns:blas_matmul", 256)
        cpus = w.call("workerfns:thread_cpus")
        assert len(cpus) >= 2, "the BLAS pool did not start: the test would prove nothing"
        assert set(cpus.values()) == {str(share.cores[0])}, cpus
        assert w.call("workerfns:getenv", "TVM_NUM_THREADS") == "1"
    assert sorted(os.sched_getaffinity(0)) == p.cores  # the parent is untouched


def test_key_ratio_is_what_was_granted():
    """Core sets are keyed by the cores granted, not the percentage asked (see spatialtune.terms)."""
    p = CpuPartition(cores=[0, 1])
    assert [p.grant(r).key_ratio for r in (25, 50, 75, 100)] == [50.0, 50.0, 100.0, 100.0]
    three = CpuPartition(cores=[0, 1, 2])
    assert three.grant(50).key_ratio == 66.6667


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_each_tvm_thread_of_a_two_core_share_has_its_own_core():
    """Left to the OS, the two threads of a 2-core share sometimes ran on one core (2x slower, at
    random); the worker binds TVM's pool thread to the second core and the calling thread to the
    first."""
    p = CpuPartition()
    share = p.grant(100 * 2 / len(p.cores))
    env = dict(os.environ) | p.worker_env(share)
    env["PYTHONPATH"] = TESTS + os.pathsep + env.get("PYTHONPATH", "")
    with Worker(init="spatialtune.measure.in_worker:init_measure_worker", init_args=("cpu", share, "cpu"),
                env=env) as w:
        cpus = w.call("workerfns:thread_cpus")
        assert cpus[w.pid] == str(share.cores[0])
        assert str(share.cores[1]) in cpus.values()
        assert all(set(v.replace("-", ",").split(",")) <= {str(c) for c in share.cores} for v in cpus.values())
