import os

import pytest

from spatialtune.measure.worker import Worker, WorkerCrashed, WorkerError, WorkerTimeout

TESTS = os.path.dirname(os.path.abspath(__file__))


def make(**kw):
    env = dict(os.environ)
    env["PYTHONPATH"] = TESTS + os.pathsep + env.get("PYTHONPATH", "")
    env.update(kw.pop("env", {}))
    return Worker(env=env, **kw)


def test_calls_return_values_and_keep_the_process():
    with make(init="workerfns:init", init_args=("x",)) as w:
        assert w.init_result == "ready x"
        assert w.call("workerfns:add", 2, 3) == 5
        p = w.call("workerfns:pid")
        assert w.call("workerfns:pid") == p == w.pid
        assert w.call("workerfns:inits") == ["x"]  # initialised once, not per call


def test_an_exception_is_reported_and_the_worker_survives():
    with make() as w:
        p = w.pid
        with pytest.raises(WorkerError, match="ValueError: bad candidate") as e:
            w.call("workerfns:boom")
        assert e.value.kind == "error" and "Traceback" in e.value.remote_traceback
        assert w.call("workerfns:add", 1, 1) == 2 and w.pid == p


def test_a_hang_costs_only_that_call():
    with make() as w:
        with pytest.raises(WorkerTimeout):
            w.call("workerfns:sleep", 60, timeout=0.5)
        assert not w.alive
        w.restart()
        assert w.call("workerfns:sleep", 0, timeout=30) == "woke"
        assert w.restarts == 1


def test_a_crash_is_reported_with_the_signal_and_restart_works():
    with make() as w:
        with pytest.raises(WorkerCrashed, match="SIGABRT"):
            w.call("workerfns:die", timeout=30)
        w.restart()
        assert w.call("workerfns:add", 1, 2) == 3


def test_environment_is_what_the_caller_gave():
    with make(env={"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25"}) as w:
        assert w.call("workerfns:getenv", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE") == "25"


def test_stdout_noise_does_not_break_the_protocol():
    with make() as w:
        w.call("builtins:print", "noise on stdout " * 100)
        assert w.call("workerfns:add", 20, 22) == 42


def test_a_failing_initialiser_fails_the_start():
    w = make(init="workerfns:boom")
    with pytest.raises(WorkerError, match="bad candidate"):
        w.start()
    assert not w.alive
    w.close()
