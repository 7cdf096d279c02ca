import shutil
import sqlite3
import threading

import pytest

from spatialtune.store.database import TuningDatabase
from spatialtune.store.schema import SCHEMA_VERSION
from spatialtune.errors import DatabaseError
from spatialtune.workloads.spec import Workload

from conftest import ROOT, run_cli
from dbutil import CPU, DENSE, GPU, meas, populate


@pytest.fixture
def db(tmp_path):
    d = TuningDatabase(tmp_path / "t.sqlite")
    populate(d)
    yield d
    d.close()


def test_new_database_is_wal_and_versioned(db):
    assert db.schema_version == SCHEMA_VERSION
    assert db.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.integrity_check() == "ok"


def test_best_is_the_fastest_ok_measurement_and_counts_trials(db):
    db.record(meas(h="a", t=3e-3))
    db.record(meas(h="b", t=1e-3))
    db.record(meas(h="c", status="wrong_result"))
    db.record(meas(h="d", t=2e-3))
    (best,) = db.best()
    assert (best.mod_hash, best.median_s, best.n_trials) == ("b", 1e-3, 4)
    assert best.trace == "trace-b"


def test_a_failed_or_wrong_kernel_never_becomes_best(db):
    db.record(meas(h="wrong", status="wrong_result"))
    db.record(meas(h="slow", status="timeout"))
    assert db.best() == []


def test_the_same_kernel_is_recorded_once_per_key(db):
    assert db.record(meas(h="a", t=1e-3)) is not None
    assert db.record(meas(h="a", t=5e-4)) is None  # a resumed job re-proposing it: first stands
    assert db.count_measurements() == 1
    assert db.best()[0].median_s == 1e-3
    # ... but it is a separate trial under another share or interference
    assert db.record(meas(h="a", ratio=50.0)) is not None
    assert db.record(meas(h="a", interference="memory")) is not None
    assert db.count_measurements() == 3


def test_keys_separate_devices(db):
    db.add_device(GPU)
    db.record(meas(h="a", t=1e-3))
    db.record(meas(h="a", t=9e-6, dev=GPU, partition="mps"))
    assert {b.device_id: b.median_s for b in db.best()} == {CPU.id: 1e-3, GPU.id: 9e-6}
    assert CPU.id != GPU.id


def test_ok_without_a_time_is_refused(db):
    m = meas(h="a")
    m.median_s = None
    with pytest.raises(DatabaseError):
        db.record(m)


def test_same_key_other_spec_is_refused(db):
    clash = Workload(op="dense", dtype="fp32", params=DENSE.params, name="x")
    db.add_workload(clash)  # same computation: fine
    assert db.workload(DENSE.key).params == dict(DENSE.params)


def test_cost_model_and_baselines_round_trip(db):
    db.save_cost_model(CPU.id, "cpu", 50, "none", "xgb", '{"kind": "xgb"}', 7)
    assert db.load_cost_model(CPU.id, "cpu", 50.0, "none") == ("xgb", '{"kind": "xgb"}', 7)
    assert db.load_cost_model(CPU.id, "cpu", 25.0, "none") is None
    db.record_baseline(DENSE.key, CPU.id, "cpu", 50, "none", "numpy", 2e-3, 4)
    (b,) = db.baselines(workload_key=DENSE.key, ratio=50)
    assert (b["kind"], b["median_s"], b["granted_units"]) == ("numpy", 2e-3, 4)


def test_newer_schema_is_refused_with_both_versions(tmp_path):
    p = tmp_path / "new.sqlite"
    TuningDatabase(p).close()
    c = sqlite3.connect(p)
    c.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    c.commit()
    c.close()
    with pytest.raises(DatabaseError, match=rf"v99 is newer .* \(v{SCHEMA_VERSION}\)"):
        TuningDatabase(p)


def test_foreign_files_are_refused_without_damage(tmp_path):
    other = tmp_path / "other.sqlite"
    c = sqlite3.connect(other)
    c.execute("CREATE TABLE notes (x)")
    c.execute("INSERT INTO notes VALUES (1)")
    c.commit()
    c.close()
    with pytest.raises(DatabaseError, match="not a spatialtune database"):
        TuningDatabase(other)
    assert sqlite3.connect(other).execute("SELECT x FROM notes").fetchall() == [(1,)]
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(DatabaseError, match="not a spatialtune database"):
        TuningDatabase(junk)
    with pytest.raises(DatabaseError, match="no such database"):
        TuningDatabase(tmp_path / "missing.sqlite", create=False)


def test_committed_v1_database_still_opens(tmp_path):
    p = tmp_path / "v1.sqlite"
    shutil.copy(ROOT / "tests" / "data" / "db_v1.sqlite", p)
    with TuningDatabase(p) as db:
        assert db.schema_version == SCHEMA_VERSION
        (best,) = db.best()
        assert (best.mod_hash, best.n_trials, best.trace) == ("h1", 4, "trace-h1")
        assert {m.mod_hash: m.trace for m in db.measurements()} == {h: f"trace-{h}" for h in ("h0", "h1", "h2", "bad")}
        assert db.load_cost_model(CPU.id, "cpu", 100, "none")[0] == "random"
        assert db.integrity_check() == "ok"


def test_a_reader_sees_consistent_data_while_a_writer_writes(tmp_path):
    p = tmp_path / "c.sqlite"
    with TuningDatabase(p) as w:
        populate(w)
    errors = []

    def write():
        with TuningDatabase(p) as w:
            for i in range(200):
                w.record(meas(h=f"h{i}", t=1.0 / (i + 1)))

    def read():
        with TuningDatabase(p) as r:
            for _ in range(200):
                with r.db.atomic():  # one snapshot for both reads
                    rows = r.best()
                    oks = r.measurements(status="ok")
                if rows and rows[0].median_s != min(m.median_s for m in oks):
                    errors.append("best lagging its measurements")

    ts = [threading.Thread(target=write), threading.Thread(target=read)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errors


def test_cli_show_on_missing_db_is_one_line(tmp_path):
    p = run_cli("show", "--db", tmp_path / "nope.sqlite")
    assert p.returncode == 2 and "no such database" in p.stderr and p.stderr.count("\n") == 1


def test_cli_show_json(tmp_path):
    import json

    path = tmp_path / "s.sqlite"
    with TuningDatabase(path) as d:
        populate(d)
        d.record(meas(h="a", t=2e-3))
        d.record(meas(h="b", t=1e-3))
    p = run_cli("show", "--db", path, "--json", check=True)
    (row,) = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert row["mod_hash"] == "b" and row["n_trials"] == 2 and row["device_name"] == "Test CPU"
    p = run_cli("show", "--db", path, "--workload", "tiny_dense", check=True)
    assert "tiny_dense" in p.stdout and "1.0 us" not in p.stdout and "1.00 ms" in p.stdout
