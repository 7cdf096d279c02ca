import dataclasses
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
    """Another driver or instruction set is another device; another unit of the same model is not."""
    other_stack = dataclasses.replace(CPU, driver="Linux 7")
    other_isa = dataclasses.replace(CPU, mattr="-avx512f")
    twin = dataclasses.replace(CPU, uuid="another-unit-of-the-same-model")
    assert len({CPU.id, other_stack.id, other_isa.id, GPU.id}) == 4 and twin.id == CPU.id
    for d in (GPU, other_stack, other_isa):
        db.add_device(d)
    db.record(meas(h="a", t=1e-3))
    db.record(meas(h="a", t=9e-6, dev=GPU, partition="mps"))
    db.record(meas(h="a", t=5e-4, dev=other_stack))
    db.record(meas(h="b", t=1e-4, dev=other_isa))
    assert {b.device_id: (b.mod_hash, b.median_s) for b in db.best()} == {
        CPU.id: ("a", 1e-3), GPU.id: ("a", 9e-6), other_stack.id: ("a", 5e-4), other_isa.id: ("b", 1e-4)}
    assert [m.median_s for m in db.measurements(device_id=CPU.id)] == [1e-3]
    assert {d["id"]: d["mattr"] for d in db.devices()}[other_isa.id] == "-avx512f"


def test_ok_without_a_time_is_refused(db):
    m = meas(h="a")
    m.median_s = None
    with pytest.raises(DatabaseError):
        db.record(m)


def test_same_key_other_spec_is_refused(db):
    """A database written when the operator computed something else under the same key (another
    revision of its definition) is refused, naming both, and left as it was."""
    renamed = Workload(op="dense", dtype="fp32", params=DENSE.params, name="x")
    db.add_workload(renamed)  # same computation under another name: the same workload
    db.record(meas(h="a"))
    db.db.execute("UPDATE workloads SET spec_hash = 'older-definition' WHERE key = ?", [DENSE.key])
    with pytest.raises(DatabaseError, match=f"workload {DENSE.key}: database has spec older-definition, "
                                            f"this spec is {DENSE.spec_hash}"):
        db.add_workload(DENSE)
    assert db.count_measurements() == 1 and db.workload(DENSE.key).params == dict(DENSE.params)


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
    d2 = dataclasses.replace(CPU, name="Second CPU")
    with TuningDatabase(path) as d:
        d.add_device(d2)
        d.record(meas(h="c", t=3e-3, dev=d2))
    p = run_cli("show", "--db", path, "--json", check=True)
    rows = json.loads(p.stdout)  # one JSON document: an array (the sqlite-utils convention)
    assert isinstance(rows, list) and len(rows) == 2
    by_dev = {r["device_name"]: r for r in rows}
    assert by_dev["Test CPU"]["mod_hash"] == "b" and by_dev["Test CPU"]["n_trials"] == 2
    assert by_dev["Second CPU"]["mod_hash"] == "c"
    p = run_cli("show", "--db", path, "--nl", check=True)
    assert [json.loads(ln)["mod_hash"] for ln in p.stdout.splitlines()] == [r["mod_hash"] for r in rows]
    p = run_cli("show", "--db", path, "--workload", "tiny_dense", check=True)
    assert "tiny_dense" in p.stdout and "1.0 us" not in p.stdout and "1.00 ms" in p.stdout


def test_committed_v2_database_is_rekeyed_by_the_granted_share(tmp_path):
    """v2 keyed core sets and green contexts by the ratio asked; v3 by what was granted: 25 % and
    50 % of 2 cores were both 1 core, one condition; a kernel measured under both keeps its first
    measurement; a 25 % green context of 132 SMs was 32 SMs, 24.2424 %, as a green:32sm bundle says."""
    p = tmp_path / "v2.sqlite"
    shutil.copy(ROOT / "tests" / "data" / "db_v2.sqlite", p)
    with TuningDatabase(p) as db:
        assert db.schema_version == SCHEMA_VERSION
        cpu = {(m.ratio, m.mod_hash): m.median_s for m in db.measurements(device_id="cpu-v2")}
        assert cpu == {(50.0, "a"): 4e-3, (50.0, "b"): 3e-3, (50.0, "c"): 5e-3, (100.0, "a"): 2e-3}
        (best50,) = db.best(device_id="cpu-v2", ratio=50)
        assert (best50.mod_hash, best50.median_s, best50.n_trials) == ("b", 3e-3, 3)
        assert [(m.ratio, m.granted_units) for m in db.measurements(device_id="cuda-v2")] == [(24.2424, 32)]
        assert [b["ratio"] for b in db.baselines(device_id="cpu-v2")] == [50.0]
        assert db.load_cost_model("cpu-v2", "cpu", 25, "none") is None  # retrained from the rows
        assert db.integrity_check() == "ok"
        assert [d["mattr"] for d in db.devices()] == [None, None]


def test_add_workload_twice_from_two_connections_is_not_an_error(tmp_path):
    """Two jobs starting on one database both register the workload: no constraint error."""
    p = tmp_path / "w.sqlite"
    with TuningDatabase(p) as a, TuningDatabase(p) as b:
        populate(a)
        b.add_workload(DENSE)  # already there, same spec
        a.add_workload(DENSE)
        assert [w.key for w in b.workloads()] == [DENSE.key]


def test_committed_v3_database_opens_with_prim_workloads_and_model_runs(tmp_path):
    """v4 adds what a model brings (a workload that is a PrimFunc, whole-model latencies): a v3 file
    keeps its operator workload and its measurements, and can take both new kinds of rows."""
    from spatialtune.store.model_runs import ModelRun, model_runs, record_model_run

    p = tmp_path / "v3.sqlite"
    shutil.copy(ROOT / "tests" / "data" / "db_v3.sqlite", p)
    with TuningDatabase(p) as db:
        assert db.schema_version == SCHEMA_VERSION
        (w,) = db.workloads()
        assert (w.key, w.name, w.prim, w.params) == ("dense_fp32_M4_N8_K16", "tiny_dense", None,
                                                     {"M": 4, "N": 8, "K": 16})
        assert {(b.ratio, b.mod_hash) for b in db.best(device_id="cpu-v3")} == {(50.0, "b"), (100.0, "a")}
        assert model_runs(db) == []
        record_model_run(db, ModelRun(run="r", model="m", model_hash="h", device_id="cpu-v3", partition="cpu",
                                      ratio=50.0, variant="onnxruntime", status="ok", latency_s=1e-3))
        assert [(m.variant, m.latency_s) for m in model_runs(db, latest=True)] == [("onnxruntime", 1e-3)]
        assert db.integrity_check() == "ok"

def test_confirming_a_kernel_appends_repeats_and_can_change_the_winner(db):
    """A confirmation adds repeats after the first ones; the median of all decides the best."""
    a, b = meas(h="a", t=1e-3), meas(h="b", t=1.2e-3)
    db.record(a)
    db.record(b)
    assert db.best()[0].mod_hash == "a"
    assert db.add_times(a, [1.5e-3] * 5) == 1.5e-3
    (m,) = [x for x in db.measurements() if x.mod_hash == "a"]
    assert m.times == [1e-3] * 3 + [1.5e-3] * 5 and m.median_s == 1.5e-3
    (best,) = db.best()
    assert (best.mod_hash, best.median_s, best.n_trials) == ("b", 1.2e-3, 2)
    with pytest.raises(DatabaseError, match="no ok measurement"):
        db.add_times(meas(h="never"), [1.0])


def test_a_confirmation_waits_for_another_jobs_write_instead_of_failing(tmp_path):
    """add_times reads before it writes. While another job holds the write lock and then commits,
    it must wait its turn (the busy timeout), not fail with 'database is locked' (CI saw that with
    eight jobs on one file)."""
    p = tmp_path / "w.sqlite"
    with TuningDatabase(p) as a, TuningDatabase(p) as b:
        populate(a)
        first = meas(h="a", t=1e-3)
        a.record(first)
        held, done = threading.Event(), threading.Event()

        def other_job():
            b.db.execute("BEGIN IMMEDIATE")
            b.db.execute("INSERT INTO meta (key, value) VALUES ('other', 'job')")
            held.set()
            done.wait(0.5)
            b.db.execute("COMMIT")

        t = threading.Thread(target=other_job)
        t.start()
        held.wait(5)
        try:
            assert a.add_times(first, [2e-3] * 5) == 2e-3
        finally:
            done.set()
            t.join()
        assert a.db.execute("SELECT value FROM meta WHERE key = 'other'").fetchone()[0] == "job"
