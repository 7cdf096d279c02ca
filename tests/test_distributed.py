"""Measuring on servers through TVM's RPC tracker, on loopback: a real tracker
(``python -m tvm.exec.rpc_tracker``) and real ``spatialtune serve`` processes, each confined to one
core, with the driver in this process (or the CLI where the command line is what is tested)."""

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest

from conftest import DEMO, ROOT, run_cli

from spatialtune.distributed.runner import RpcRunner
from spatialtune.distributed.tracker import servers_under, tracker_summary
from spatialtune.measure.runner import RunSettings
from spatialtune.store.database import TuningDatabase
from spatialtune.tuning import TuneOptions, tune
from spatialtune.workloads.spec import load_space

FAST = RunSettings(repeat=3, min_repeat_ms=5, warmup_ms=10, timeout=20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(p: subprocess.Popen) -> None:
    """The process, its session processes and its measuring workers (their own process groups)."""
    try:
        family = psutil.Process(p.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for proc in [p, *family]:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    p.wait(10)


def start_tracker(port: int, log_path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                          "--port-end", str(port + 1)], stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
                         start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            tracker_summary("127.0.0.1", port, timeout=2)
            return p
        except Exception:
            if p.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the tracker did not start:\n{open(log_path).read()[-2000:]}")
            time.sleep(0.3)


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    port = free_port()
    p = start_tracker(port, tmp_path_factory.mktemp("tracker") / "tracker.log")
    yield f"127.0.0.1:{port}"
    kill_tree(p)


@pytest.fixture
def servers(tmp_path):
    """``start(tracker, key, cores, env=None)`` starts ``spatialtune serve``; all are killed after."""
    started = []

    def start(tracker, key, cores, env=None):
        port = free_port()
        log = tmp_path / f"serve-{key}-{cores}.log"
        p = subprocess.Popen([sys.executable, "-m", "spatialtune.cli", "serve", "--tracker", tracker, "--key", key,
                              "--cores", str(cores), "--host", "127.0.0.1", "--port", str(port), "--port-end",
                              str(port + 1)], stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT,
                             env=env or os.environ.copy(), start_new_session=True)
        started.append(p)
        p.addr, p.log = f"127.0.0.1:{port}", log
        return p

    yield start
    for p in started:
        kill_tree(p)


def wait_registered(tracker, key, procs, timeout=60):
    host, port = tracker.rsplit(":", 1)
    want = {p.addr for p in procs}
    deadline = time.monotonic() + timeout
    while not want <= set(servers_under(tracker_summary(host, int(port)), key)):
        for p in procs:
            assert p.poll() is None, f"server exited:\n{p.log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"servers did not register under {key}"
        time.sleep(0.3)


def dense(n=1):
    return load_space(DEMO).select(["dense_small", "bmm_small"][:n])


def opts(**kw):
    return TuneOptions(**{"trials": 8, "batch": 4, "baselines": False, "run": FAST, "population": 16,
                           "genetic_iters": 1} | kw)


def confirmed(rows) -> int:
    """Measurements a job's confirmation makes: the fastest ok kernels of a key (4, at most a
    third of them, at least 2), twice each."""
    ok = sum(m.status == "ok" for m in rows)
    return 2 * min(4, max(2, ok // 3)) if ok >= 2 else 0


def rows_by_key(db_path):
    with TuningDatabase(db_path) as db:
        out = {}
        for m in db.measurements():
            out.setdefault(m.key, []).append(m)
        return out


def key() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def test_a_job_over_two_servers_records_every_trial_once_like_a_local_run(tracker, servers, tmp_path):
    k = key()
    a, b = servers(tracker, k, 0), servers(tracker, k, 1)
    with TuningDatabase(tmp_path / "local.sqlite") as db:
        local = tune(dense(), [100], db, opts())
    wait_registered(tracker, k, [a, b])
    with RpcRunner(tracker, k, settings=FAST) as runner, TuningDatabase(tmp_path / "rpc.sqlite") as db:
        remote = tune(dense(), [100], db, opts(baselines=True), runner=runner)
        stats = runner.stats()
        baselines = {b["kind"] for b in db.baselines()}
    by_key = rows_by_key(tmp_path / "rpc.sqlite")
    assert [r.n_trials for r in remote.results] == [r.n_trials for r in local.results] == [8]
    (rows,) = by_key.values()
    assert len({m.mod_hash for m in rows}) == len(rows) == 8
    # Every measurement a server returned was recorded, and none was made twice: the trials, two
    # baselines and the confirmation of the winners (each of the top 4 twice, as repeats of its row).
    assert sum(s["measured"] for s in stats.values()) == sum(m.status != "build_error" for m in rows) + 2 \
        + confirmed(rows)
    assert sum(len(m.times) > FAST.repeat for m in rows) == confirmed(rows) // 2
    assert all(stats[p.addr]["measured"] > 0 for p in (a, b)), stats  # the batches were spread
    assert remote.device.units == 1 and rows[0].device_id == remote.device.id  # the servers' device, one core
    assert baselines == {"tvm-default", "numpy"}  # timed on the servers too


# Server A's measuring worker kills A, its session processes and itself from inside its first
# measurement: the crash lands mid-measurement every time, whatever the timing of the job.
KILL_AT_FIRST_MEASUREMENT = """
import os, signal, sys
if 'spatialtune.measure.worker' in ' '.join(getattr(sys, 'orig_argv', [])):
    import psutil
    import spatialtune.measure.in_worker as iw

    def measure_one(*args, **kwargs):
        server = next(p for p in psutil.Process().parents() if 'serve' in p.cmdline())
        groups = [c.pid for c in server.children(recursive=True)]
        for pgid in [server.pid, *[g for g in groups if g != os.getpid()], os.getpid()]:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    iw.measure_one = measure_one
"""


def test_killing_a_server_mid_job_loses_nothing_and_the_job_finishes_on_the_other(tracker, servers, tmp_path):
    site = tmp_path / "kill-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(KILL_AT_FIRST_MEASUREMENT)
    k = key()
    a = servers(tracker, k, 0, env=dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}"))
    b = servers(tracker, k, 1)
    wait_registered(tracker, k, [a, b])
    with RpcRunner(tracker, k, settings=FAST) as runner, TuningDatabase(tmp_path / "k.sqlite") as db:
        summary = tune(dense(2), [100], db, opts(), runner=runner)
        stats = runner.stats()
    assert a.wait(30) == -signal.SIGKILL  # A died inside a measurement of this job
    assert stats[a.addr]["failures"] >= 1 and stats[a.addr]["measured"] == 0, stats
    assert [r.n_trials for r in summary.results] == [8, 8]
    for rows in rows_by_key(tmp_path / "k.sqlite").values():
        assert len({m.mod_hash for m in rows}) == len(rows) == 8
        assert not [m.error for m in rows if "server" in m.error]  # nothing recorded as lost to the kill


def test_a_server_whose_measurements_all_fail_is_set_aside(tracker, servers, tmp_path, caplog):
    # A real fault, not a flag: this server's Python environment kills every measuring worker it
    # starts (as a box whose device was lost would), so it can answer RPC but never measure.
    # The good server's measuring worker starts only once the broken one has failed as often as
    # the pool tolerates (3 in a row): without that gate the good server can measure the whole
    # batch before the broken one has failed three times, and nothing would be set aside.
    failed = tmp_path / "failed-starts"
    broken, gated = tmp_path / "broken-site", tmp_path / "gated-site"
    is_worker = "if 'spatialtune.measure.worker' in ' '.join(getattr(sys, 'orig_argv', [])):\n"
    broken.mkdir()
    (broken / "sitecustomize.py").write_text(
        "import os, sys\n" + is_worker +
        f"    open({str(failed)!r}, 'a').write('x')\n"
        "    os._exit(3)\n")
    gated.mkdir()
    (gated / "sitecustomize.py").write_text(
        "import os, sys, time\n" + is_worker +
        "    end = time.monotonic() + 60\n"
        f"    while time.monotonic() < end and (not os.path.exists({str(failed)!r})\n"
        f"                                       or len(open({str(failed)!r}).read()) < 3):\n"
        "        time.sleep(0.05)\n")
    k = key()
    good = servers(tracker, k, 0, env=dict(os.environ, PYTHONPATH=f"{gated}{os.pathsep}{ROOT}"))
    bad = servers(tracker, k, 1, env=dict(os.environ, PYTHONPATH=f"{broken}{os.pathsep}{ROOT}"))
    wait_registered(tracker, k, [good, bad])
    caplog.set_level(logging.WARNING, logger="spatialtune.distributed")
    with RpcRunner(tracker, k, settings=FAST) as runner, TuningDatabase(tmp_path / "e.sqlite") as db:
        summary = tune(dense(), [100], db, opts(batch=8), runner=runner)
        stats = runner.stats()
    assert summary.results[0].n_trials == 8
    assert stats[bad.addr]["aside"] and stats[bad.addr]["measured"] == 0, stats
    (rows,) = rows_by_key(tmp_path / "e.sqlite").values()
    assert stats[good.addr]["measured"] == 8 + confirmed(rows) and not stats[good.addr]["aside"]
    aside = [r.getMessage() for r in caplog.records if "aside" in r.getMessage()]
    assert len(aside) == 1 and bad.addr in aside[0] and "measuring worker did not start" in aside[0], aside
    assert not [m.error for m in rows if "server" in m.error]


def test_a_lane_that_fails_unexpectedly_stops_the_job_instead_of_hanging_it(tracker, servers, tmp_path,
                                                                            monkeypatch):
    """Any error inside a measuring lane (a bug, not a server failing) ends the job with one line:
    a lane thread that died silently would leave the batch it held waiting for ever."""
    from spatialtune.distributed.pool import ServerPool
    from spatialtune.errors import DeviceError

    real = ServerPool._call

    def broken(self, worker, timeout, doing, fn, *args):
        if fn == "measure":
            raise KeyError("bug")
        return real(self, worker, timeout, doing, fn, *args)

    monkeypatch.setattr(ServerPool, "_call", broken)
    k = key()
    s = servers(tracker, k, 0)
    wait_registered(tracker, k, [s])
    raised = []

    def job():
        with RpcRunner(tracker, k, settings=FAST) as runner, TuningDatabase(tmp_path / "l.sqlite") as db:
            try:
                tune(dense(), [100], db, opts(batch=4), runner=runner)
            except DeviceError as e:
                raised.append(str(e))

    t = threading.Thread(target=job, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "the job still waits for a batch no lane will measure"
    assert raised and "a measuring lane failed (KeyError" in raised[0], raised


def test_the_tracker_going_away_stops_the_job_cleanly_and_the_same_command_resumes(servers, tmp_path):
    port = free_port()
    tracker = f"127.0.0.1:{port}"
    t = start_tracker(port, tmp_path / "tracker.log")
    try:
        k = key()
        s = servers(tracker, k, 0)
        wait_registered(tracker, k, [s])
        db = tmp_path / "resume.sqlite"
        cmd = [sys.executable, "-m", "spatialtune.cli", "tune", "--space", str(DEMO), "--workload", "dense_small",
               "--trials", "12", "--batch", "4", "--repeat", "3", "--no-baselines", "--population", "16",
               "--genetic-iters", "1", "--tracker", tracker, "--key", k,
               "--db", str(db)]
        first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while first.poll() is None and not (db.exists() and len(_all(db)) >= 4):
            time.sleep(0.2)
        # The server goes too: a job that still holds a session with it would finish without the
        # tracker (the small batches build in well under a second). Now it must ask for a server.
        kill_tree(t)
        kill_tree(s)
        killed = time.monotonic()
        try:
            out, err = first.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            first.kill()
            out, err = first.communicate()
            raise AssertionError(f"the job did not stop within 240 s of losing the tracker:\n{err[-4000:]}")
        print(f"stopped {time.monotonic() - killed:.1f} s after the tracker went away")
        assert first.returncode == 2, err
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]  # after the progress lines
        assert last.startswith("spatialtune: error: lost the tracker: tracker") and "same command again" in last, err
        kept = {m.id for m in _all(db)}
        assert 4 <= len(kept) < 12

        t0 = time.monotonic()
        t = start_tracker(port, tmp_path / "tracker.log")
        s = servers(tracker, k, 0)
        wait_registered(tracker, k, [s], timeout=90)
        t1 = time.monotonic()
        again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        print(f"tracker and server back in {t1 - t0:.1f} s, the rerun took {time.monotonic() - t1:.1f} s")
        assert again.returncode == 0, again.stderr
        rows = _all(db)
        assert kept <= {m.id for m in rows} and len(rows) == len({m.mod_hash for m in rows}) == 12
    finally:
        kill_tree(t)


def _all(db_path):
    with TuningDatabase(db_path, create=False) as db:
        return db.measurements()


def test_a_session_timeout_is_said_as_such(tracker, servers):
    from spatialtune.distributed import client
    from spatialtune.distributed.tracker import ServerRequest

    k = key()
    s = servers(tracker, k, 0)
    wait_registered(tracker, k, [s])
    host, port = tracker.rsplit(":", 1)
    req = ServerRequest(host, int(port), k)
    try:
        got = req.wait(30)
    finally:
        req.close()
    info = client.open_session(*got, 1)
    assert info["device"]["units"] == 1 and info["cores"] == [0]
    time.sleep(2)
    reply = client.measure({"protocol": 0}, None, None)
    client.close_session()
    assert "session time limit expired" in reply["rpc_error"], reply


def test_bad_tracker_input_is_one_line_and_exit_code_2(tracker):
    closed = f"127.0.0.1:{free_port()}"
    space = ["tune", "--space", DEMO, "--workload", "dense_small", "--trials", "2"]
    for args, says in [
        ([*space, "--tracker", "localhost", "--key", "k"], "expected HOST:PORT"),
        ([*space, "--tracker", closed, "--key", "k", "--server-wait", "1"], "refused the connection"),
        ([*space, "--tracker", tracker], "needs --key"),
        ([*space, "--tracker", tracker, "--key", "nobody", "--server-wait", "1"], "no server is registered"),
        (["serve", "--tracker", closed, "--key", "k", "--tracker-wait", "1"], "refused the connection"),
        (["serve", "--tracker", tracker, "--key", "k", "--cores", "4096"], "not available here"),
    ]:
        p = run_cli(*args, timeout=120)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert p.stderr.strip().count("\n") == 0 and says in p.stderr, (args, p.stderr)
