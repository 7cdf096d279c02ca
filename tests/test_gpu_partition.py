"""GPU partitions up to the driver: ratio <-> SM mapping, the MPS daemon's start/stop commands and
environment (a fake nvidia-cuda-mps-control records its calls), cleanup on errors and signals,
the green-context cudaSetDevice shim against a fake libcuda, and the no-GPU CLI path."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import HAS_GPU, ROOT, run_cli
from spatialtune.errors import DeviceError
from spatialtune.partitions.green import GreenPartition
from spatialtune.partitions.mps import MpsPartition
from spatialtune.partitions.sm import mps_sms_for_ratio, ratio_for_sms, sms_for_ratio
from spatialtune.partitions import create_partition

FAKE_MPS = r"""#!/usr/bin/env bash
# Fake MPS control: logs every call; -d "starts" a daemon (creates the control pipe), quit removes it.
log="$FAKE_MPS_LOG"
if [ "${1:-}" = "-d" ]; then
  echo "start pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY" >> "$log"
  [ -n "${FAKE_MPS_FAIL:-}" ] && { echo "cannot start" >&2; exit 1; }
  touch "$CUDA_MPS_PIPE_DIRECTORY/control"
  exit 0
fi
read -r cmd
echo "cmd=$cmd pipe=$CUDA_MPS_PIPE_DIRECTORY" >> "$log"
[ -n "${FAKE_MPS_HANG:-}" ] && sleep 30
[ "$cmd" = quit ] && rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"
[ "$cmd" = get_server_list ] && echo 4242
exit 0
"""


@pytest.fixture
def fake_mps(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    ctl = bindir / "nvidia-cuda-mps-control"
    ctl.write_text(FAKE_MPS)
    ctl.chmod(0o755)
    log = tmp_path / "mps.log"
    log.write_text("")
    monkeypatch.setenv("FAKE_MPS_LOG", str(log))
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    return ctl, log


# ---------------------------------------------------------------- ratio <-> SMs


def test_green_sm_mapping_hopper():
    assert sms_for_ratio(100, 132) == 132
    assert [sms_for_ratio(ratio_for_sms(n, 132), 132) for n in (8, 16, 32, 64, 96, 128, 132)] == \
        [8, 16, 32, 64, 96, 128, 132]
    assert sms_for_ratio(50, 132) == 64  # 66 -> nearest 8-SM step
    assert sms_for_ratio(1, 132) == 8  # at least one step
    assert sms_for_ratio(99.9, 132) == 128  # never a partial "whole device"
    assert all(sms_for_ratio(r, 132) % 8 == 0 for r in range(1, 100))
    assert ratio_for_sms(132, 132) == 100.0
    with pytest.raises(Exception):
        ratio_for_sms(0, 132)


def test_green_partition_grants_recorded_share():
    p = GreenPartition(total_sms=132, shim="/x/shim.so")
    s = p.grant_sms(64)
    assert (s.partition_kind, s.units, s.total, s.unit) == ("green", 64, 132, "SM")
    assert p.grant(s.ratio).units == 64  # the recorded ratio maps back to the granted SMs
    assert p.worker_env(p.grant(100)) == {}  # whole device: primary context, no shim
    env = p.worker_env(s)
    assert env["LD_PRELOAD"].startswith("/x/shim.so") and env["SPATIALTUNE_GREEN_SHIM"] == "/x/shim.so"
    rest = p.neighbour_share(s)
    assert rest.units == 68 and rest.total == 132


def test_mps_grant_and_neighbour():
    p = MpsPartition(total_sms=132)
    assert [p.grant(r).units for r in (100, 50, 25, 12)] == [132, 66, 33, 16]
    assert mps_sms_for_ratio(12.5, 132) == 17
    assert p.neighbour_share(p.grant(25)).ratio == 75
    assert p.neighbour_share(p.grant(100)).ratio == 100  # a neighbour of the whole GPU shares it
    assert create_partition("mps", total_sms=132).kind == "mps"
    assert create_partition("green", total_sms=132).kind == "green"


# ---------------------------------------------------------------- MPS daemon


def test_mps_private_daemon_start_env_quit(fake_mps):
    ctl, log = fake_mps
    p = MpsPartition(total_sms=132)
    with p:
        assert p.started and p.control == str(ctl)
        pipe = p.pipe_dir
        assert pipe.startswith(p._tmp) and os.path.exists(os.path.join(pipe, "control"))
        env = p.worker_env(p.grant(25))
        assert env == {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25", "CUDA_MPS_PIPE_DIRECTORY": pipe,
                       "CUDA_MPS_LOG_DIRECTORY": p.log_dir}
        assert p.worker_env(p.grant(12.5))["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "12.5"
    lines = log.read_text().splitlines()
    assert lines[0].startswith(f"start pipe={pipe} log=")
    assert lines[-1] == f"cmd=quit pipe={pipe}"
    assert not p.started and not os.path.exists(pipe)  # private dirs removed
    p.teardown()  # safe twice
    assert log.read_text().count("quit") == 1


def test_mps_uses_users_daemon_and_leaves_it(fake_mps, tmp_path, monkeypatch):
    _, log = fake_mps
    pipe = tmp_path / "userpipe"
    pipe.mkdir()
    (pipe / "control").write_text("")
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(pipe))
    with MpsPartition(total_sms=132) as p:
        assert not p.started and p.pipe_dir == str(pipe)
        assert p.worker_env(p.grant(50))["CUDA_MPS_PIPE_DIRECTORY"] == str(pipe)
    assert log.read_text().splitlines() == [f"cmd=get_server_list pipe={pipe}"]  # never started, never quit
    assert (pipe / "control").exists()


def test_mps_missing_control_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("spatialtune.partitions.mps.MPS_SEARCH_DIRS", (str(tmp_path),))
    with pytest.raises(DeviceError) as e:
        MpsPartition(total_sms=132).setup()
    assert "nvidia-cuda-mps-control" in str(e.value) and "\n" not in str(e.value)


def test_mps_start_failure_cleans_up(fake_mps, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_FAIL", "1")
    p = MpsPartition(total_sms=132)
    with pytest.raises(DeviceError, match="failed to start"):
        p.setup()
    assert p._tmp is None and not p.started


def test_mps_hanging_daemon_times_out(fake_mps, tmp_path, monkeypatch):
    pipe = tmp_path / "userpipe"
    pipe.mkdir()
    (pipe / "control").write_text("")
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(pipe))
    monkeypatch.setenv("FAKE_MPS_HANG", "1")
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="did not answer"):
        MpsPartition(total_sms=132, timeout=1.0).setup()
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("how", ["sigterm", "sigint", "error"])
def test_mps_daemon_quit_on_signal_or_error(fake_mps, tmp_path, how):
    _, log = fake_mps
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        from spatialtune.partitions.mps import MpsPartition
        p = MpsPartition(total_sms=132)
        p.setup()
        print(p.pipe_dir, flush=True)
        if {how!r} == "error":
            raise RuntimeError("boom")   # no teardown call: atexit must quit the daemon
        time.sleep(30)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    pipe = proc.stdout.readline().strip()
    assert pipe, proc.stderr.read()
    if how != "error":
        proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
    proc.wait(timeout=20)
    assert f"cmd=quit pipe={pipe}" in log.read_text().splitlines()
    assert not os.path.exists(pipe)


# ---------------------------------------------------------------- green-context shim


FAKE_LIBCUDA = r"""
#include <stdio.h>
#include <stdlib.h>
int cuCtxSetCurrent(void *ctx) {
  FILE *f = fopen(getenv("FAKE_CUDA_LOG"), "a"); fprintf(f, "cuCtxSetCurrent %p\n", ctx); fclose(f); return 0;
}
"""
FAKE_CUDART = r"""
#include <stdio.h>
#include <stdlib.h>
int cudaSetDevice(int d) {
  FILE *f = fopen(getenv("FAKE_CUDA_LOG"), "a"); fprintf(f, "real cudaSetDevice %d\n", d); fclose(f); return 0;
}
"""


def _cc(src: str, out: Path, *extra: str) -> None:
    c = out.with_suffix(".c")
    c.write_text(src)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(out), str(c), *extra], check=True, capture_output=True)


@pytest.mark.skipif(subprocess.run(["sh", "-c", "command -v cc"], capture_output=True).returncode != 0,
                    reason="no C compiler")
def test_green_shim_redirects_cudaSetDevice(tmp_path):
    from spatialtune.cuda.green import build_green_shim

    shim = build_green_shim(str(tmp_path / "shim.so"))
    _cc(FAKE_LIBCUDA, tmp_path / "libcuda.so.1")
    _cc(FAKE_CUDART, tmp_path / "libcudart.so.13")
    log = tmp_path / "cuda.log"
    code = textwrap.dedent(f"""
        import ctypes
        rt = ctypes.CDLL({str(tmp_path / 'libcudart.so.13')!r}, mode=ctypes.RTLD_GLOBAL)
        g = ctypes.CDLL(None)
        g.spatialtune_green_set.argtypes = [ctypes.c_void_p]
        g.spatialtune_green_calls.restype = ctypes.c_ulong
        assert g.cudaSetDevice(0) == 0          # no green context: the real one
        g.spatialtune_green_set(0x1234)
        assert g.cudaSetDevice(0) == 0          # green: the green context is made current instead
        assert g.spatialtune_green_calls() == 1
        g.spatialtune_green_set(None)
        assert g.cudaSetDevice(1) == 0
    """)
    env = dict(os.environ, LD_PRELOAD=shim, LD_LIBRARY_PATH=str(tmp_path), FAKE_CUDA_LOG=str(log))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert log.read_text().splitlines() == ["real cudaSetDevice 0", "cuCtxSetCurrent 0x1234", "real cudaSetDevice 1"]


# ---------------------------------------------------------------- no GPU


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU path")
@pytest.mark.parametrize("partition", ["mps", "green"])
def test_tune_cuda_without_gpu_is_one_line_exit_2(tmp_path, partition):
    t0 = time.monotonic()
    r = run_cli("tune", "--space", "search_spaces/gpu_probe.toml", "--target", "cuda", "--partition", partition,
                "--trials", "1", "--db", tmp_path / "t.sqlite", timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("spatialtune: error:") and "GPU" in lines[0], r.stderr
    assert time.monotonic() - t0 < 60


@pytest.mark.gpu
def test_mps_real_daemon_roundtrip():
    """On a GPU host: a private daemon starts, answers and quits."""
    p = MpsPartition()
    with p:
        assert p.control_cmd("get_server_list") is not None
    assert not p.started


def test_tvm_default_on_a_gpu_is_a_schedule_that_builds():
    """TVM's untuned baseline for CUDA: the unscheduled loop nest has no thread binding, and TVM 0.27
    compiles it to host code alone (loops over device memory on the CPU, no kernel); the default
    GPU schedule Relax falls back to gives a CUDA kernel (no GPU needed to compile)."""
    import tvm

    from spatialtune.device import target_for
    from spatialtune.search.space import default_candidate
    from spatialtune.workloads.spec import Workload

    w = Workload(op="dense", dtype="fp32", params={"M": 64, "N": 64, "K": 64})
    target = target_for({"kind": "cuda", "name": "H200", "units": 132, "arch": "sm_90"})
    unscheduled = tvm.compile(w.ir_module(), target=tvm.target.Target(target))
    assert not any(m.kind == "cuda" for m in unscheduled.mod.imports)
    c = default_candidate(w, target)
    lib = tvm.compile(tvm.ir.load_json(c.mod_json), target=tvm.target.Target(target))
    assert any(m.kind == "cuda" for m in lib.mod.imports)


def test_the_search_runs_on_the_hosts_cores_not_the_shares_sms():
    """MetaSchedule's evolution gets this machine's core count as its thread count, whatever the
    share's units (before: a 132-SM share asked for 132 CPU threads)."""
    import os

    from spatialtune.device import detect_cpu, target_for
    from spatialtune.search.cost_model import create_cost_model
    from spatialtune.search.policy import SharePolicy
    from spatialtune.terms import Condition
    from spatialtune.workloads.spec import Workload

    w = Workload(op="dense", dtype="fp32", params={"M": 16, "N": 16, "K": 16})
    policy = SharePolicy(w, target_for(detect_cpu()), Condition("mps", 50.0, "none"), [], create_cost_model("random"),
                         share_units=(66, 132))
    try:
        assert policy.search.space.ctx.num_threads == len(os.sched_getaffinity(0))
    finally:
        policy.close()
