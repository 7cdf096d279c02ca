"""The CUDA worker side without a GPU: cubin lookup at load, the poisoned-context exit and the
worker restart after it, GPU neighbours' commands and environment, the neighbour kernels' cubin."""

import hashlib
import json
import os
import sys

import pytest

from conftest import HAS_GPU
from spatialtune.cuda import tvm_runtime as rt
from spatialtune.measure.vendor import measure_torch
from spatialtune.partitions import create_partition
from spatialtune.errors import ConfigError, DeviceError
from spatialtune.neighbours.gpu import GpuNeighbour, neighbour_cubin_path, register_tenant
from spatialtune.partitions.green import GreenPartition
from spatialtune.partitions.mps import MpsPartition

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_precompiled_callback_returns_the_matching_cubin(tmp_path, monkeypatch):
    monkeypatch.setattr(rt, "_state", {"cubins": {}, "pending": None, "tvm": None})
    src = 'extern "C" __global__ void main_kernel() {}'
    cub = tmp_path / "a.cubin"
    cub.write_bytes(b"\x7fELF-fake-cubin")
    (tmp_path / "a.cubin.json").write_text(json.dumps({"source_sha256": hashlib.sha256(src.encode()).hexdigest()}))
    rt.register_cubin(str(cub))
    assert bytes(rt._precompiled(src)) == b"\x7fELF-fake-cubin"
    # another source while this module loads: its own shipped cubin, never a compile
    assert bytes(rt._precompiled("// other")) == b"\x7fELF-fake-cubin"
    rt._state["pending"] = None
    with pytest.raises(DeviceError, match="refusing to JIT"):
        rt._precompiled("// other")


# ---------------------------------------------------------------- poisoned contexts


@pytest.mark.gpu
def test_a_kernel_that_poisons_the_context_costs_only_itself(tmp_path):
    """For real on a GPU: a kernel reading far outside its input leaves the CUDA context unusable;
    the worker notices (after the kernel, before any timing), leaves, is restarted, and the next
    candidate is measured in the fresh worker."""
    import tvm
    from tvm import te

    from spatialtune.device import detect_cuda, target_for
    from spatialtune.measure.builder import BuildInput, LocalBuilder
    from spatialtune.measure.runner import LocalRunner, RunInput, RunSettings
    from spatialtune.search.space import default_candidate
    from spatialtune.workloads.spec import Workload

    w = Workload(op="dense", dtype="fp32", params={"M": 64, "N": 64, "K": 64})
    target = target_for(detect_cuda())
    X = te.placeholder((64, 64), "float32", name="X")
    W = te.placeholder((64, 64), "float32", name="W")
    Y = te.compute((64, 64), lambda i, j: X[i + 100_000_000, j], name="Y")  # 25 GB past X
    bad = tvm.IRModule({"main": te.create_prim_func([X, W, Y]).with_attr("global_symbol", "main")})
    with tvm.target.Target(target):
        import tvm.s_tir.transform

        bad = tvm.s_tir.transform.DefaultGPUSchedule()(bad)
    good = default_candidate(w, target)
    with LocalBuilder(tmp_path, workers=1) as b:
        built = b.build([BuildInput(tvm.ir.save_json(bad), "bad"), BuildInput(good.mod_json, "good")], target)
    assert all(x.ok for x in built), [x.error for x in built]
    part = create_partition("green", total_sms=detect_cuda().units)
    with part, LocalRunner(part, device_kind="cuda", settings=RunSettings(repeat=2, min_repeat_ms=1)) as r:
        first, second = r.run(part.grant(100), "none", [RunInput(w.to_dict(), x.artifact, x.cubin) for x in built])
    assert first.status == "runtime_error" and f"exit code {rt.POISONED_EXIT}" in first.error, first.error
    assert second.status == "ok" and second.median_s > 0, second.error


# ---------------------------------------------------------------- neighbours


def test_mps_neighbour_gets_the_complement(tmp_path):
    p = MpsPartition(total_sms=132)
    p.pipe_dir, p.log_dir = "/tmp/pipe-x", "/tmp/log-x"
    n = GpuNeighbour("compute", p, cubin="/x/n.cubin")
    cfg, env = n.config(p.grant(25))
    assert env == {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "75", "CUDA_MPS_PIPE_DIRECTORY": "/tmp/pipe-x",
                   "CUDA_MPS_LOG_DIRECTORY": "/tmp/log-x"}
    assert cfg["cubin"] == "/x/n.cubin" and cfg["neighbour_units"] == 99 and "green_beside" not in cfg
    _, env = n.config(p.grant(100))
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "100"
    argv, _, cores = n.command(p.grant(50))
    assert argv[:3] == [sys.executable, "-m", "spatialtune.neighbours.gpu"] and cores is None
    assert n.unit == "GFLOP/s" and GpuNeighbour("memory", p).unit == "GB/s"


def test_green_neighbour_takes_the_rest(tmp_path):
    p = GreenPartition(total_sms=132, shim="/x/shim.so")
    cfg, env = GpuNeighbour("memory", p, cubin="/x/n.cubin").config(p.grant_sms(32))
    assert cfg["green_beside"] == 32 and cfg["neighbour_units"] == 100 and env == {}
    cfg, env = GpuNeighbour("compute", p, cubin="/x/n.cubin").config(p.grant(100))
    assert "green_beside" not in cfg  # beside the whole device: shares it
    register_tenant("mm_x", {"op": "matmul", "dtype": "fp32", "params": {"M": 8, "N": 8, "K": 8}}, "/x/a.so",
                    "/x/a.cubin")
    cfg, env = GpuNeighbour("tenant:mm_x", p).config(p.grant_sms(64))
    assert cfg["tenant"]["artifact"] == "/x/a.so" and env["LD_PRELOAD"].startswith("/x/shim.so")


def test_unknown_tenant_and_kind():
    with pytest.raises(ConfigError, match="no built kernel"):
        GpuNeighbour("tenant:nobody", None).config(None)
    with pytest.raises(ConfigError):
        GpuNeighbour("disk", None)


def test_neighbour_cubin_builds(tmp_path):
    from spatialtune.cuda.cubin import check_cubin, find_nvcc

    if not find_nvcc():
        pytest.skip("no nvcc on this machine")
    p = neighbour_cubin_path("sm_90", cache_dir=str(tmp_path))
    blob = open(p, "rb").read()
    assert b"fma_loop" in blob and b"copy4" in blob
    assert "sm_90" in check_cubin(p, "sm_90")


@pytest.mark.gpu
def test_neighbour_runs_and_reports_throughput():
    from spatialtune.neighbours.base import NeighbourReading
    import time

    n = GpuNeighbour("compute", None)
    with n.running(None) as meter:
        a = meter.read()
        time.sleep(0.5)
        tp = NeighbourReading.between(a, meter.read())
    assert tp is not None and tp.throughput > 100 and tp.unit == "GFLOP/s"


# ---------------------------------------------------------------- vendor baseline (cuBLAS through torch)

MM = {"op": "matmul", "dtype": "fp32", "params": {"M": 16, "N": 8, "K": 4}, "name": "mm_small"}


def test_torch_baseline_without_torch_is_a_status(monkeypatch):
    """No torch in this Python: a row saying so, no exception (the run goes on)."""
    from spatialtune.measure.runner import RunSettings
    from spatialtune.workloads.spec import Workload

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError, torch installed or not
    w = Workload.from_dict(MM).to_dict()
    r = measure_torch(w, RunSettings(repeat=2, min_repeat_ms=1), 0)
    assert r["status"] == "unavailable" and "torch cannot be imported" in r["error"]
    conv = Workload.from_dict({"op": "conv2d", "dtype": "fp32", "params": {
        "N": 1, "C": 4, "H": 8, "W": 8, "K": 4, "R": 3, "S": 3, "stride": 1, "pad": 1}}).to_dict()
    with pytest.raises(ConfigError, match="no cuBLAS baseline for conv2d"):
        measure_torch(conv, RunSettings(), 0)


@pytest.mark.skipif(HAS_GPU, reason="checks the no-torch / no-GPU path through a real worker")
def test_vendor_baselines_through_a_worker_without_torch_turn_off():
    """measure_vendor calls the worker; without a usable torch it records one row and stops asking."""
    from spatialtune.bundle.run import measure_vendor
    from spatialtune.terms import Condition
    from spatialtune.partitions import create_partition
    from spatialtune.measure.runner import LocalRunner, RunSettings
    from spatialtune.workloads.spec import Workload

    w = Workload.from_dict(MM)
    conv = Workload.from_dict({"op": "conv2d", "dtype": "fp32", "params": {
        "N": 1, "C": 4, "H": 8, "W": 8, "K": 4, "R": 3, "S": 3, "stride": 1, "pad": 1}})
    man = {"workloads": {w.key: w.to_dict(), conv.key: conv.to_dict()}}
    part = create_partition("cpu")
    state: dict = {"off": None}
    with part, LocalRunner(part, device_kind="cpu", settings=RunSettings(timeout=60)) as runner:
        share = part.grant(100.0)
        rows = measure_vendor(runner, share, Condition("cpu", ratio=100.0), man, state)
        assert [r["workload_key"] for r in rows] == [w.key]  # the conv has no cuBLAS baseline
        (r,) = rows
        assert r["status"] == "unavailable" and r["kind"] == "cublas" and r["condition"] == "cpu:100%"
        assert r["ratio"] == 100.0 and r.get("median_s") is None
        assert state["off"]
        assert measure_vendor(runner, share, Condition("cpu", ratio=100.0), man, state) == []
