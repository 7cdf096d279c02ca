"""TVM interop: the MetaSchedule export opened by TVM's own JSONDatabase, import as measured
records, and merging databases of several hosts."""

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from conftest import run_cli
from dbutil import CPU, DENSE, GPU, meas, populate
from spatialtune.store.database import TuningDatabase
from spatialtune.errors import ConfigError, DatabaseError
from spatialtune.lookup.metaschedule import export_metaschedule
from spatialtune.store.merge import merge_databases
from spatialtune.store.metaschedule import RECORD_FILE, WORKLOAD_FILE, import_metaschedule


@pytest.fixture
def tuned_copy(tuned_db, tmp_path):
    path = tmp_path / "tuned.sqlite"
    src, dst = sqlite3.connect(tuned_db[0]), sqlite3.connect(path)
    src.backup(dst)  # the WAL's content included, unlike a file copy
    src.close()
    dst.close()
    return path


def test_export_is_read_by_tvm_json_database(tuned_copy, tmp_path):
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from spatialtune.workloads.schedule import apply_trace as replay_trace
    from spatialtune.lookup import Lookup
    from spatialtune.workloads.schedule import mod_hash

    out = tmp_path / "ms"
    p = run_cli("db", "export-metaschedule", "--db", tuned_copy, "--ratio", "75", "--out", out, check=True)
    summary = json.loads(p.stdout)
    assert {e["match"] for e in summary["exported"]} == {"below"} and len(summary["exported"]) == 2
    msdb = ms.database.JSONDatabase(path_workload=str(out / WORKLOAD_FILE),
                                    path_tuning_record=str(out / RECORD_FILE), allow_missing=False)
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    with TuningDatabase(tuned_copy, create=False) as db, Lookup(tuned_copy) as lk:
        assert len(msdb.get_all_tuning_records()) == 2
        for w in db.workloads():
            best = db.best(workload_key=w.key, ratio=50)[0]  # 75 % asks for the config of 50 %
            rec = msdb.query_tuning_record(w.ir_module(), target, w.key)
            assert rec is not None
            got = tvm.ir.save_json(rec.trace.as_json())
            assert got == best.trace or mod_hash(replay_trace(w, got).mod) == best.mod_hash
            assert mod_hash(replay_trace(w, got).mod) == best.mod_hash
            assert [float(t) for t in rec.run_secs] == [best.median_s]
            assert lk.lookup(w.key, ratio=75).mod_hash == best.mod_hash
            # what a tvm.compile pipeline would get from the database: the same kernel
            sch = msdb.query_schedule(w.ir_module(), target, w.key)
            assert mod_hash(sch.mod) == best.mod_hash


def test_export_refuses_what_it_cannot_export(tuned_copy, tmp_path):
    with TuningDatabase(tuned_copy, create=False) as db:
        with pytest.raises(ConfigError, match="nothing to export"):
            export_metaschedule(db, 50, tmp_path / "x", interference="none", partition="mps")
        with pytest.raises(ConfigError, match="percentage"):
            export_metaschedule(db, 0, tmp_path / "x")
    p = run_cli("db", "export-metaschedule", "--db", tmp_path / "absent.sqlite", "--ratio", "50", "--out", tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1


def test_import_takes_records_as_measurements(tuned_copy, tmp_path):
    out = tmp_path / "ms"
    with TuningDatabase(tuned_copy, create=False) as db:
        export_metaschedule(db, 100, out)
        whole = {b.workload_key: b for b in db.best(ratio=100)}
        device = db.devices()[0]["id"]
    fresh = tmp_path / "fresh.sqlite"
    # without workloads to match against, nothing is taken
    with TuningDatabase(fresh) as db:
        s = import_metaschedule(db, out, 30)
        assert (s.records, s.imported, s.unmatched) == (2, 0, 2)
    p = run_cli("db", "import-metaschedule", out, "--ratio", "30", "--db", fresh, "--space",
                Path(__file__).resolve().parent.parent / "search_spaces" / "demo.toml", check=True)
    s = json.loads(p.stdout)
    assert (s["imported"], s["unmatched"], s["invalid"], s["device_id"]) == (2, 0, 0, device)
    with TuningDatabase(fresh, create=False) as db:
        ms = db.measurements()
        # timed by MetaSchedule without our output check: stored, but no best config (no answer)
        assert {m.source for m in ms} == {"import"} and {m.status for m in ms} == {"unchecked"}
        assert {m.ratio for m in ms} == {30}
        assert {m.workload_key: m.mod_hash for m in ms} == {k: b.mod_hash for k, b in whole.items()}
        assert {m.workload_key: m.median_s for m in ms} == {k: b.median_s for k, b in whole.items()}
        assert len(db.best(ratio=30)) == 0
        # again: the same kernels under the same key are not recorded twice
        s2 = import_metaschedule(db, out, 30)
        assert (s2.imported, s2.duplicates) == (0, 2)
        with pytest.raises(ConfigError, match="not a MetaSchedule database"):
            import_metaschedule(db, tmp_path, 30)
        with pytest.raises(ConfigError, match="no device nope"):
            import_metaschedule(db, out, 30, device_id="nope")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_merge_keeps_everything_once_and_never_writes_the_sources(tmp_path):
    a, b, c = tmp_path / "a.sqlite", tmp_path / "b.sqlite", tmp_path / "c.sqlite"
    with TuningDatabase(a) as db:
        populate(db)
        db.record(meas(ratio=100, h="h1", t=2e-3, created_at="2026-11-01T00:00:00Z"))
        db.record(meas(ratio=50, h="h2", t=3e-3))
        db.record(meas(ratio=50, h="bad", status="build_error"))
        db.record_baseline(DENSE.key, CPU.id, "cpu", 100, "none", "numpy", 1e-3)
    with TuningDatabase(b) as db:
        populate(db)
        db.add_device(GPU)
        db.record(meas(ratio=100, h="h1", t=9e-3))  # measured on both hosts: A's stands
        db.record(meas(ratio=100, h="h3", t=1e-3))  # B found a better one
        db.record(meas(dev=GPU, ratio=50, h="g1", t=1e-5, partition="mps"))
        db.record_baseline(DENSE.key, CPU.id, "cpu", 100, "none", "numpy", 7e-3)
    before = (_sha(a), _sha(b))
    p = run_cli("db", "merge", a, b, "--out", c, check=True)
    s = json.loads(p.stdout)
    assert (s["measurements"], s["duplicates"], s["devices"], s["workloads"], s["best"]) == (5, 1, 2, 1, 3)
    assert (_sha(a), _sha(b)) == before
    with TuningDatabase(c, create=False) as db:
        assert db.count_measurements() == 5
        assert [m.median_s for m in db.measurements(ratio=100) if m.mod_hash == "h1"] == [2e-3]
        assert [m.created_at for m in db.measurements(ratio=100) if m.mod_hash == "h1"] == ["2026-11-01T00:00:00Z"]
        (best,) = db.best(device_id=CPU.id, ratio=100)
        assert (best.mod_hash, best.median_s, best.n_trials) == ("h3", 1e-3, 2)
        assert [x["median_s"] for x in db.baselines()] == [1e-3]
        assert db.best(device_id=GPU.id)[0].mod_hash == "g1"
    # merging is idempotent in content
    d = tmp_path / "d.sqlite"
    merge_databases([c, a, b], d)
    with TuningDatabase(d, create=False) as db:
        assert db.count_measurements() == 5
    p = run_cli("db", "merge", a, b, "--out", c)
    assert p.returncode == 2 and "already exists" in p.stderr
    with pytest.raises(DatabaseError, match="no such database"):
        merge_databases([a, tmp_path / "absent.sqlite"], tmp_path / "e.sqlite")
    assert not (tmp_path / "e.sqlite").exists()


def test_an_imported_record_is_served_only_once_checked_then_seeds_the_other_shares(tuned_copy, tmp_path):
    """An imported kernel is no answer until ``tune`` of its share has run it through the output
    check; then it is, and tuning another share measures it there first."""
    from spatialtune.lookup import Lookup
    from spatialtune.measure.runner import RunSettings
    from spatialtune.tuning import TuneOptions, tune

    out = tmp_path / "ms"
    with TuningDatabase(tuned_copy, create=False) as db:
        export_metaschedule(db, 100, out)
        w = next(x for x in db.workloads() if x.name == "dense_small")
        imported = db.best(workload_key=w.key, ratio=100)[0].mod_hash
    fresh = tmp_path / "fresh.sqlite"
    with TuningDatabase(fresh) as db:
        db.add_workload(w)
        assert import_metaschedule(db, out, 100).imported == 1
    with Lookup(fresh, check_interval_s=None) as lk:
        assert not lk.lookup(w.key, ratio=100).found
    with Lookup(fresh, check_interval_s=None, include_unchecked=True) as lk:
        r = lk.lookup(w.key, ratio=100)
        assert (r.mod_hash, r.checked) == (imported, False)
    opts = TuneOptions(trials=1, batch=1, baselines=False, confirm_top=0, run=RunSettings(repeat=2))
    with TuningDatabase(fresh) as db:
        tune([w], [100], db, opts)  # the budget is spent (the import counts), the check is not skipped
        (m,) = db.measurements(ratio=100)
        assert (m.mod_hash, m.source, m.status) == (imported, "import", "ok") and m.rel_err is not None
    with Lookup(fresh, check_interval_s=None) as lk:
        r = lk.lookup(w.key, ratio=100)
        assert (r.mod_hash, r.checked, r.match) == (imported, True, "exact")
    with TuningDatabase(fresh) as db:
        tune([w], [50], db, opts)
        (m,) = db.measurements(ratio=50)
        assert (m.mod_hash, m.source, m.status) == (imported, "transfer", "ok")
