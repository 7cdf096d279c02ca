"""The database holds every measurement it paid for: one transaction per measurement as it
completes, several jobs on one database, and readers that cannot write."""
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from conftest import DEMO, ROOT, run_cli
from spatialtune.store.database import TuningDatabase


def _count(db_path) -> int:
    try:
        c = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            return c.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]
        finally:
            c.close()
    except sqlite3.Error:
        return 0


def _cli(*args):
    return [sys.executable, "-m", "spatialtune.cli", *map(str, args)]


def test_a_kill_between_two_measurements_of_a_batch_loses_nothing_finished(tmp_path):
    """Each measurement is recorded when it completes: killed in the middle of a batch of 6, the
    job leaves the ones it finished, and the rerun measures only the rest."""
    db = tmp_path / "k.sqlite"
    args = ["tune", "--space", DEMO, "--workload", "dense_small", "--ratios", "100", "--trials", "6", "--batch", "6",
            "--repeat", "5", "--no-baselines", "--build-workers", "1", "--db", db]
    proc = subprocess.Popen(_cli(*args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    seen = 0
    while time.time() < deadline and proc.poll() is None:
        seen = _count(db)
        if 2 <= seen < 6:
            break
        time.sleep(0.02)
    assert proc.poll() is None and 2 <= seen < 6, f"never saw a batch half recorded (last count {seen})"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with TuningDatabase(db) as d:
        assert d.integrity_check() == "ok"
        before = {m.mod_hash: (m.times, m.created_at) for m in d.measurements()}
    assert 2 <= len(before) < 6
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    with TuningDatabase(db) as d:
        after = d.measurements()
    assert len(after) == 6 and len({m.mod_hash for m in after}) == 6  # nothing measured twice
    # kept as measured (a confirmation of the winners may add repeats after the first ones)
    assert {m.mod_hash: (m.times[:len(before[m.mod_hash][0])], m.created_at) for m in after if m.mod_hash in before} \
        == before


def test_eight_jobs_on_one_database_and_overlapping_keys(tmp_path):
    """Eight `spatialtune tune` processes at once on one database, four of them on the same key:
    every one finishes, nothing is measured twice under a key, and each key stays within its
    budget plus one batch per job on it."""
    db = tmp_path / "shared.sqlite"
    trials, batch = 4, 2  # two batches per job and key: enough for jobs to overlap on a key
    jobs = [("dense_small", "100")] * 4 + [("dense_small", "50,100")] * 2 + [("bmm_small", "100")] * 2
    procs = []
    for w, ratios in jobs:
        args = ["tune", "--space", DEMO, "--workload", w, "--ratios", ratios, "--trials", trials, "--batch", batch,
                "--repeat", "2", "--no-baselines", "--build-workers", "1", "--population", "32", "--db", db]
        procs.append(subprocess.Popen(_cli(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=900) for p in procs]
    for (w, ratios), p, (out, err) in zip(jobs, procs, outs):
        assert p.returncode == 0, f"{w} @ {ratios}: {err}"
        assert "Traceback" not in err
    with TuningDatabase(db) as d:
        assert d.integrity_check() == "ok"
        ms = d.measurements()
        keys = {}
        for m in ms:
            keys.setdefault((m.workload_key, m.ratio), []).append(m.mod_hash)
        per_key_jobs = {("dense_small", 100.0): 6, ("dense_small", 50.0): 2, ("bmm_small", 100.0): 2}
        names = {w.key: w.name for w in d.workloads()}
        for (wk, r), hashes in keys.items():
            assert len(hashes) == len(set(hashes)), f"{wk} @ {r}: a kernel measured twice"
            n_jobs = per_key_jobs[(names[wk], r)]
            assert trials <= len(hashes) <= trials + batch * n_jobs, (wk, r, len(hashes))
            oks = [m.median_s for m in ms if (m.workload_key, m.ratio) == (wk, r) and m.status == "ok"]
            (b,) = d.best(workload_key=wk, ratio=r)
            assert b.median_s == min(oks) and b.n_trials == len(hashes)
        assert set(per_key_jobs) == {(names[wk], r) for wk, r in keys}


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to read as a user who cannot write the directory")
def test_lookup_of_a_wal_database_in_a_read_only_directory(tmp_path):
    """A scheduler running as another user reads the database it cannot write: it answers; and
    when the directory is read-only and the write-ahead log still holds data, one line says why
    it cannot."""
    ro = tmp_path / "ro"
    ro.mkdir()
    db = ro / "db.sqlite"
    shutil.copy(ROOT / "tuning_db" / "spatialtune.sqlite", db)
    c = sqlite3.connect(db)
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    c.close()
    for p in ro.glob("db.sqlite-*"):
        p.unlink()
    os.chmod(ro, 0o555)
    os.chmod(db, 0o444)
    os.chmod(tmp_path, 0o755)
    for parent in tmp_path.parents:  # let the other user reach the directory
        if str(parent) in ("/", "/tmp"):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o005)
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(as_nobody + _cli("lookup", "--db", db, "--workload", "mm_1024", "--units", "32",
                                        "--partition", "mps", "--any-device"), capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert '"match": "exact"' in p.stdout and '"tuned_ratio": 25.0' in p.stdout
    os.chmod(ro, 0o755)
    (ro / "db.sqlite-wal").write_bytes(b"\0" * 100)
    os.chmod(ro, 0o555)
    p = subprocess.run(as_nobody + _cli("lookup", "--db", db, "--workload", "mm_1024", "--ratio", "25"),
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "read-only" in p.stderr, p.stderr
    os.chmod(ro, 0o755)
