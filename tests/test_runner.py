"""Builder and runner for real: TVM builds on this CPU, measured under a core cap."""
import json
import re

import pytest

from spatialtune.measure.builder import BuildInput, LocalBuilder
from spatialtune.device import detect_cpu, target_for
from spatialtune.partitions.cpu import CpuPartition
from spatialtune.measure.runner import LocalRunner, RunInput, RunSettings
from spatialtune.search.space import default_candidate
from spatialtune.workloads.spec import Workload

TARGET = target_for(detect_cpu())

TINY = {
    "matmul": dict(M=16, N=24, K=32),
    "dense": dict(M=16, N=24, K=32),
    "batch_matmul": dict(B=2, M=8, N=12, K=16, transpose_b=1),
    "conv2d": dict(N=1, C=4, H=9, W=9, K=6, R=3, S=3, stride=2, pad=1),
    "depthwise_conv2d": dict(N=1, C=4, H=9, W=9, R=3, S=3, stride=1, pad=1),
}
DENSE = Workload(op="dense", dtype="fp32", params={"M": 16, "N": 24, "K": 32}, name="d")


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    with LocalBuilder(tmp_path_factory.mktemp("art"), workers=2) as b:
        yield b


@pytest.fixture(scope="module")
def runner():
    with LocalRunner(CpuPartition(), settings=RunSettings(repeat=2, min_repeat_ms=1, timeout=60)) as r:
        yield r


def _te_module(w, body, in_dtype="float32"):
    """A module with the workload's signature but another computation (for failure tests)."""
    import tvm
    from tvm import te

    X = te.placeholder((w.params["M"], w.params["K"]), in_dtype, name="X")
    W = te.placeholder((w.params["N"], w.params["K"]), in_dtype, name="W")
    Y = te.compute((w.params["M"], w.params["N"]), lambda i, j: body(X, W, i, j), name="Y")
    return tvm.ir.save_json(tvm.IRModule({"main": te.create_prim_func([X, W, Y]).with_attr("global_symbol", "main")}))


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("op", sorted(TINY))
def test_every_operator_builds_runs_and_matches_its_reference(builder, runner, op, dtype):
    w = Workload(op=op, dtype=dtype, params=TINY[op])
    c = default_candidate(w, TARGET)
    (b,) = builder.build([BuildInput(c.mod_json, f"{op}-{dtype}")], TARGET)
    assert b.ok, b.error
    (r,) = runner.run(CpuPartition().grant(100), "none", [RunInput(w.to_dict(), b.artifact)])
    assert r.status == "ok", r.error
    assert r.rel_err < 1e-5 and r.median_s > 0 and len(r.times) == 2


def test_a_wrong_kernel_is_caught_and_never_timed(builder, runner):
    from tvm import te

    k = te.reduce_axis((0, DENSE.params["K"] - 1), name="k")  # an off-by-one tiling bug
    wrong = _te_module(DENSE, lambda X, W, i, j: te.sum(X[i, k] * W[j, k], axis=k))
    half = _te_module(DENSE, lambda X, W, i, j: X[i, 0] * W[j, 0])  # writes everything, wrongly
    built = builder.build([BuildInput(wrong, "wrong"), BuildInput(half, "half")], TARGET)
    res = runner.run(CpuPartition().grant(100), "none", [RunInput(DENSE.to_dict(), b.artifact) for b in built])
    for r in res:
        assert r.status == "wrong_result" and r.times == [] and r.median_s is None
        assert "relative error" in r.error


def test_a_crashing_kernel_costs_only_itself(builder, runner):
    # Reads ~1.3 GB past its input: a segfault in the measuring worker.
    crash = _te_module(DENSE, lambda X, W, i, j: X[i + 10_000_000, j % DENSE.params["K"]])
    good = default_candidate(DENSE, TARGET)
    built = builder.build([BuildInput(crash, "crash"), BuildInput(good.mod_json, "good")], TARGET)
    assert all(b.ok for b in built)
    res = runner.run(CpuPartition().grant(100), "none", [RunInput(DENSE.to_dict(), b.artifact) for b in built])
    assert res[0].status == "runtime_error" and "died" in res[0].error
    assert res[1].status == "ok"


def test_a_hanging_kernel_times_out_and_the_next_one_runs(builder):
    big = Workload(op="dense", dtype="fp32", params={"M": 512, "N": 512, "K": 512})
    slow = default_candidate(big, TARGET)  # naive loops, well over the limit below
    (b,) = builder.build([BuildInput(slow.mod_json, "slow")], TARGET)
    with LocalRunner(CpuPartition(), settings=RunSettings(repeat=50, min_repeat_ms=1000, timeout=1.0)) as r:
        first, second = r.run(CpuPartition().grant(100), "none",
                              [RunInput(big.to_dict(), b.artifact), RunInput(big.to_dict(), b.artifact)])
    assert first.status == second.status == "timeout"
    assert first.run_s < 30


def _unrolled_matmul(n: int) -> str:
    """An n x n x n matmul with every loop unrolled: its build time grows with n^3 (n=8: 0.1 s,
    n=32: several seconds), like the pathological candidates of a design space."""
    import tvm
    from tvm import te

    X, W = te.placeholder((n, n), "float32", name="X"), te.placeholder((n, n), "float32", name="W")
    k = te.reduce_axis((0, n), name="k")
    Y = te.compute((n, n), lambda i, j: te.sum(X[i, k] * W[j, k], axis=k), name="Y")
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func([X, W, Y]).with_attr("global_symbol", "main")}))
    for loop in sch.get_loops(sch.get_sblock("Y")):
        sch.unroll(loop)
    return tvm.ir.save_json(sch.mod)


def test_a_build_far_slower_than_its_workloads_median_is_cut_and_the_others_go_on(tmp_path):
    fast, slow = [_unrolled_matmul(n) for n in (7, 6, 5, 8)], _unrolled_matmul(24)  # n=9 builds 6x slower than 8
    with LocalBuilder(tmp_path, workers=1, relative_timeout=5, min_timeout=0.5, min_samples=3) as b:
        assert b.deadline("w", TARGET) == b.timeout  # no history yet: the fixed limit
        built = b.build([BuildInput(fast[i], f"f{i}", "w") for i in range(3)], TARGET)
        assert all(r.ok for r in built)
        # 5x their median build (about 0.1 s on a quiet machine; the load of a parallel test run
        # has made it 0.47), at least 0.5: absolute bounds made this test fail under load
        med = sorted(r.build_s for r in built)[1]
        assert b.deadline("w", TARGET) == pytest.approx(max(0.5, 5 * med))
        cut, after = b.build([BuildInput(slow, "slow", "w"), BuildInput(fast[3], "f3", "w")], TARGET)
        assert not cut.ok and "over 5x the median build of this workload" in cut.error
        assert cut.build_s < max(0.5, 5 * med) + 2  # cut at the limit, not after the build finished
        median, limit = map(float, re.search(r"\((\d+\.\d+) s\), cut at (\d+\.\d+) s", cut.error).groups())
        assert median == pytest.approx(med, abs=0.006) and limit == pytest.approx(max(0.5, 5 * med), abs=0.06)
        assert after.ok  # the worker was replaced; the next candidate builds
        # another workload has no history yet: the same slow build gets the fixed limit and succeeds
        (other,) = b.build([BuildInput(slow, "slow-other", "v")], TARGET)
        assert other.ok and other.build_s > 0.5
    # by default one build of the workload is history enough: the floor keeps the limit sane
    with LocalBuilder(tmp_path / "d", workers=1, min_timeout=0.5) as b:
        first, cut = b.build([BuildInput(fast[0], "f0", "w"), BuildInput(slow, "slow", "w")], TARGET)
        assert first.ok and not cut.ok and "cut at" in cut.error


def test_a_module_built_for_a_target_is_compiled_once_while_its_files_last(tmp_path):
    """Confirming a key's winners and measuring a config under another neighbour build modules
    the job built already: the builder hands back the files it made instead of compiling again,
    for the same target only, and never a file written over since."""
    m = _unrolled_matmul(8)
    one_core = dict(TARGET, **{"num-cores": 1})
    with LocalBuilder(tmp_path, workers=1) as b:
        (first,) = b.build([BuildInput(m, "a")], TARGET)
        (again,) = b.build([BuildInput(m, "b")], TARGET)
        assert first.ok and first.build_s > 0
        assert again.artifact == first.artifact and again.build_s == 0
        (other,) = b.build([BuildInput(m, "a")], one_core)  # another target, written over a.so
        assert other.ok and other.build_s > 0
        (rebuilt,) = b.build([BuildInput(m, "c")], TARGET)  # a.so is not TARGET's build any more
        assert rebuilt.build_s > 0 and rebuilt.artifact.endswith("c.so")
        b.artifact_dir = str(tmp_path / "elsewhere")  # as a bundle does per workload
        (moved,) = b.build([BuildInput(m, "c")], TARGET)
        assert moved.build_s > 0 and moved.artifact == str(tmp_path / "elsewhere" / "c.so")


def test_a_build_failure_is_data(builder):
    (b,) = builder.build([BuildInput("{not json", "broken")], TARGET)
    assert not b.ok and "build error" in b.error


def test_memory_neighbour_throughput_is_recorded(builder):
    c = default_candidate(DENSE, TARGET)
    (b,) = builder.build([BuildInput(c.mod_json, "n")], TARGET)
    part = CpuPartition()
    with LocalRunner(part, settings=RunSettings(repeat=3, min_repeat_ms=50)) as r:
        (res,) = r.run(part.grant(50), "memory", [RunInput(DENSE.to_dict(), b.artifact)])
    assert res.status == "ok"
    assert res.neighbour_unit == "GB/s" and res.neighbour_throughput > 0.1


def test_numpy_baseline(runner):
    r = runner.measure_baseline(CpuPartition().grant(100), "none", DENSE.to_dict(), "numpy")
    assert r.status == "ok" and r.median_s > 0


def test_one_wrong_element_of_a_large_fp16_output_is_caught(builder, runner):
    """A dense that is right everywhere but one element: its whole-array error (about 1e-3 here)
    is inside the fp16 tolerance, so only the per-element check can catch it."""
    import tvm
    from tvm import te, tirx

    big = Workload(op="dense", dtype="fp16", params={"M": 512, "N": 512, "K": 32})
    k = te.reduce_axis((0, 32), name="k")

    def body(X, W, i, j):
        acc = te.sum(X[i, k].astype("float32") * W[j, k].astype("float32"), axis=k)
        return acc

    right = _te_module(big, body, "float16")
    # the same kernel with one element off: Y[7, 9] gets its value plus 1 (about half the typical |Y|, 1.9)
    X, W = (te.placeholder((512, 32), "float16", name=n) for n in ("X", "W"))
    Y = te.compute((512, 512), lambda i, j: te.sum(X[i, k].astype("float32") * W[j, k].astype("float32"), axis=k),
                   name="Y")
    Z = te.compute((512, 512), lambda i, j: Y[i, j] + tirx.if_then_else(tirx.all(i == 7, j == 9),
                                                                         tirx.const(1.0, "float32"),
                                                                         tirx.const(0.0, "float32")), name="Z")
    wrong = tvm.ir.save_json(tvm.IRModule({"main": te.create_prim_func([X, W, Z]).with_attr("global_symbol", "main")}))
    built = builder.build([BuildInput(right, "right16"), BuildInput(wrong, "wrong16")], TARGET)
    ok, bad = runner.run(CpuPartition().grant(100), "none", [RunInput(big.to_dict(), b.artifact) for b in built])
    assert ok.status == "ok", ok.error
    assert bad.status == "wrong_result" and bad.median_s is None and bad.times == []
    assert bad.rel_err < 2e-3  # what the whole-array check alone would have let through
    assert "1 elements off" in bad.error and "(7, 9)" in bad.error


def test_an_exception_in_the_worker_restarts_it_and_costs_one_candidate(tmp_path):
    """A Python exception inside a measuring call leaves a process nobody vouches for: it is
    restarted, the candidate is a runtime_error, the next one is measured in a fresh process."""
    import os

    from spatialtune.measure.runner import metered_call
    from spatialtune.measure.worker import Worker
    from spatialtune.neighbours.base import Meter

    tests = os.path.dirname(os.path.abspath(__file__))
    flag = tmp_path / "flag"
    flag.write_text("raise")
    env = dict(os.environ, PYTHONPATH=tests + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with Worker(env=env, name="raiser") as w:
        pid = w.pid
        r = metered_call(w, Meter(), 30, "workerfns:raise_then_answer", str(flag))
        assert r["status"] == "runtime_error" and "a kernel raised" in r["error"]
        assert w.alive and w.pid != pid and w.restarts == 1
        flag.write_text("answer")
        r = metered_call(w, Meter(), 30, "workerfns:raise_then_answer", str(flag))
        assert r["status"] == "ok" and r["pid"] == w.pid != pid


def test_a_worker_that_cannot_restart_costs_one_candidate_not_the_job(tmp_path):
    """A crash, then a restart that fails (the device is not ready): that candidate's result says
    so, and the next candidate starts the worker again and is measured."""
    import os

    from spatialtune.measure.runner import metered_call
    from spatialtune.measure.worker import Worker
    from spatialtune.neighbours.base import Meter

    tests = os.path.dirname(os.path.abspath(__file__))
    flag = tmp_path / "not-ready"
    env = dict(os.environ, PYTHONPATH=tests + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with Worker(init="workerfns:fail_on_start", init_args=(str(flag),), env=env, name="flaky") as w:
        first = metered_call(w, Meter(), 30, "workerfns:die")
        assert first["status"] == "runtime_error" and "died" in first["error"]
        flag.write_text("")
        second = metered_call(w, Meter(), 30, "workerfns:answer")
        assert second["status"] == "runtime_error" and "the device is not ready" in second["error"]
        flag.unlink()
        third = metered_call(w, Meter(), 30, "workerfns:answer")
        assert third["status"] == "ok" and third["pid"] == w.pid


def test_a_cpu_job_registers_only_its_own_families_tensor_intrinsics():
    """Design spaces name tensor intrinsics, so they are registered first; an x86 host skips the
    Arm ones (a second of every job's start) and a CPU job the CUDA ones (12 s)."""
    import platform
    import subprocess
    import sys

    from spatialtune.workloads.schedule import intrinsic_families

    assert intrinsic_families({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-v2"}) == ("arm_cpu",)
    assert intrinsic_families({"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu"}) == ("x86",)
    assert intrinsic_families({"kind": "cuda", "arch": "sm_90"}) == ("cuda",)
    assert {"cuda", "x86", "arm_cpu"} <= set(intrinsic_families(None))  # a trace of unknown origin: all
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the host check below is for x86 hosts")
    code = ("import sys, json; from spatialtune.search.space import DesignSpace; from spatialtune.workloads.spec "
            "import Workload; w = Workload.from_dict(json.loads(sys.argv[1])); DesignSpace(w, json.loads(sys.argv[2])); "
            "print(sorted(m.rsplit('.', 1)[1] for m in sys.modules if m.startswith('tvm.s_tir.tensor_intrin.')))")
    p = subprocess.run([sys.executable, "-c", code, json.dumps(DENSE.to_dict()), json.dumps(TARGET)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    loaded = p.stdout.strip().splitlines()[-1]
    assert "'x86'" in loaded and "arm_cpu" not in loaded and "cuda" not in loaded, loaded


def test_an_operator_jobs_measuring_workers_load_only_tvms_runtime(tmp_path, demo_space):
    """Operator workloads are checked against numpy, so a job of them measures in workers that load
    TVM's runtime library only (TVM_USE_RUNTIME_LIB): a third of the start time, 80 MB not 190."""
    import os
    import threading
    import time

    import psutil

    from spatialtune.store.database import TuningDatabase
    from spatialtune.tuning import TuneOptions, tune

    seen: dict[int, set[str]] = {}
    stop = threading.Event()
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # other tests' runners

    def watch() -> None:
        while not stop.is_set():
            for p in psutil.Process().children(recursive=True):
                try:
                    if p.pid not in before and any("measure-cpu" in a for a in p.cmdline()):
                        libs = {os.path.basename(m.path) for m in p.memory_maps() if "libtvm" in m.path}
                        if libs:
                            seen[p.pid] = libs
                except psutil.Error:
                    pass
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        with TuningDatabase(tmp_path / "db.sqlite") as db:
            s = tune(demo_space.select(["dense_small"]), [100], db,
                     TuneOptions(trials=2, batch=2, population=16, genetic_iters=1, baselines=False,
                                 run=RunSettings(repeat=2, min_repeat_ms=5)))
    finally:
        stop.set()
        t.join()
    assert s.results[0].best_s, "nothing was measured"
    assert seen, "no measuring worker was seen"
    for libs in seen.values():
        assert "libtvm_runtime.so" in libs and "libtvm_compiler.so" not in libs, libs


def test_a_transient_slow_state_of_blas_does_not_become_the_numpy_anchor(monkeypatch):
    """numpy is timed at its best of a few rounds, in case the quiet before it (tested below) was
    not long enough: an anchor timed slow flatters every kernel compared with it. Here the first
    round's calls are slow."""
    import time as _time

    from spatialtune.measure import vendor
    from spatialtune.measure.runner import RunSettings

    settings = RunSettings(repeat=3, min_repeat_ms=2, warmup_ms=0)
    calls = []

    def impl(w):
        def fn(xs):  # the warm-up call and the first round's three (one 4 ms call per repeat) are slow
            calls.append(1)
            _time.sleep(0.004 if len(calls) <= 4 else 0.0002)
        return fn

    monkeypatch.setattr(vendor, "_numpy_impl", impl)
    monkeypatch.setattr(vendor, "QUIET_S", 0.0)
    r = vendor.measure_numpy(DENSE.to_dict(), settings, 0)
    assert r["status"] == "ok" and r["median_s"] < 0.002, r


def test_numpy_is_timed_after_tvms_pool_has_gone_quiet_on_the_shares_blas_threads(monkeypatch):
    """On the benchmarks' VM numpy ran 10x slow while TVM's pool threads were still spinning after
    a kernel (up to 0.3 s), every round alike. Here every call within 0.3 s of the start is slow,
    so only the quiet before the timing gives the fast time; and numpy gets one BLAS thread per
    core of the share (a worker's references run on one), the count before it afterwards."""
    import os
    import time as _time

    from spatialtune.measure import blas, vendor
    from spatialtune.measure.runner import RunSettings

    assert blas.available(), "numpy's OpenBLAS was not found: measuring workers would time kernels next to its spinning threads"
    settings = RunSettings(repeat=2, min_repeat_ms=2, warmup_ms=0)
    start, seen = _time.perf_counter(), set()

    def impl(w):
        def fn(xs):
            seen.add(blas.get_threads())
            _time.sleep(0.004 if _time.perf_counter() - start < 0.3 else 0.0002)
        return fn

    monkeypatch.setattr(vendor, "_numpy_impl", impl)
    monkeypatch.setattr(vendor, "QUIET_S", 0.35)
    blas.set_threads(1)
    try:
        r = vendor.measure_numpy(DENSE.to_dict(), settings, 0)
        assert blas.get_threads() == 1
    finally:
        blas.set_threads(len(os.sched_getaffinity(0)))
    assert r["status"] == "ok" and r["median_s"] < 0.002, r
    assert seen == {len(os.sched_getaffinity(0))}, seen


def test_a_measuring_worker_computes_its_references_on_one_blas_thread():
    """BLAS threads spinning after a two-thread reference put a 2x repeat into most kernel timings
    on the benchmarks' VM (see spatialtune.measure.blas)."""
    from spatialtune.measure.worker import Worker

    share = CpuPartition().grant(100)
    with Worker(init="spatialtune.measure.in_worker:init_measure_worker", init_args=("cpu", share, "cpu"),
                env={"OPENBLAS_NUM_THREADS": str(share.units)}) as w:
        assert w.call("spatialtune.measure.blas:get_threads", timeout=60) == 1


def test_under_cold_every_kernel_and_numpy_run_is_timed_after_an_eviction(builder, monkeypatch):
    """``cold`` starts no co-runner; it turns on the settings' cold timing for the kernels and the
    numpy anchor alike, also when a measuring server changes the runner's settings per request."""
    from spatialtune.errors import ConfigError
    from spatialtune.measure import in_worker, runner as runner_mod, vendor
    from spatialtune.neighbours import create_neighbour

    c = default_candidate(DENSE, TARGET)
    (b,) = builder.build([BuildInput(c.mod_json, "cold")], TARGET)
    part = CpuPartition()
    with LocalRunner(part, settings=RunSettings(repeat=3, min_repeat_ms=1, warmup_ms=1)) as r:
        (res,) = r.run(part.grant(50), "cold", [RunInput(DENSE.to_dict(), b.artifact)])
        assert res.status == "ok" and len(res.times) == 3 and res.neighbour_throughput is None
        seen = []
        real = runner_mod.metered_call
        monkeypatch.setattr(runner_mod, "metered_call", lambda w, m, t, fn, *a: seen.append((fn, a[-2])) or real(w, m, t, fn, *a))
        with r.hold(part.grant(50), "cold") as held:
            held.measure(RunInput(DENSE.to_dict(), b.artifact))
            r.settings = RunSettings(repeat=2, min_repeat_ms=1, warmup_ms=1)  # as a server does per request
            held.numpy(DENSE.to_dict())
        with r.hold(part.grant(50), "none") as held:
            held.measure(RunInput(DENSE.to_dict(), b.artifact))
    assert [(fn.rsplit(":")[1], s.cold, s.repeat) for fn, s in seen] == [
        ("measure_one", True, 3), ("measure_numpy", True, 2), ("measure_one", False, 2)]
    events = []
    monkeypatch.setattr(in_worker, "evict", lambda: events.append("evict"))
    out = vendor.measure_numpy(DENSE.to_dict(), RunSettings(repeat=2, warmup_ms=1, cold=True), 0)
    assert out["status"] == "ok" and len(out["times"]) == 2
    assert events == ["evict"] * 2 * vendor.NUMPY_ROUNDS
    with pytest.raises(ConfigError, match="CPUs only"):
        create_neighbour("cold", device_kind="cuda")
