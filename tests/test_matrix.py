"""The winners matrix on real tuned databases: every cell's answer is the fastest kernel measured
there, each condition's winners are measured under every other condition, whichever order the
conditions were tuned in, and after a kill in the middle of the matrix and a resume."""

import pytest

from spatialtune.measure.runner import RunSettings
from spatialtune.search.policy import best_by_key, missing_winners, winner_origins
from spatialtune.store.database import TuningDatabase
from spatialtune.terms import Condition
from spatialtune.tuning import TuneOptions, tune

TOP = TuneOptions().matrix_top


def check_invariants(db: TuningDatabase, wkey: str) -> dict:
    """The invariants a scheduler relies on, per device and partition of ``wkey``; returns the
    best row per key."""
    out = {}
    for dev in {m.device_id for m in db.measurements(workload_key=wkey)}:
        rows = db.measurements(workload_key=wkey, device_id=dev)
        for part in {m.partition for m in rows}:
            rs = [m for m in rows if m.partition == part]
            ok = best_by_key(rs)
            stored = {Condition.of(b): b for b in db.best(workload_key=wkey, device_id=dev, partition=part)}
            assert set(stored) == set(ok)
            for k, ms in ok.items():  # a cell's best is never slower than any kernel measured in it
                assert stored[k].median_s == ms[0].median_s and stored[k].mod_hash == ms[0].mod_hash
            for src, ms in ok.items():
                for dst in ok:
                    if dst == src:
                        continue
                    here = {m.mod_hash: m for m in rs if Condition.of(m) == dst}
                    for m in ms[:TOP]:  # every winner was tried in every other cell...
                        assert m.mod_hash in here, f"{m.mod_hash} of {src} never measured at {dst}"
                        got = here[m.mod_hash]
                        if got.status == "ok":  # ... and the cell's best is at least as fast as it there
                            assert stored[dst].median_s <= got.median_s
                        else:  # or the reason it could not run there is recorded
                            assert got.error
            assert not missing_winners(rs, TOP)
            out.update(stored)
    return out


def test_invariants_quiet_first_then_the_neighbour(tenancy_db, tuned_db):
    """tuned_db (both workloads quiet at 100 and 50 %) then dense_small next to the memory
    neighbour: a share's best is never slower than a smaller share's winner measured at it, and
    the quiet best never slower than the neighbour's winner measured quiet."""
    with TuningDatabase(tenancy_db[0], create=False) as db:
        for w in db.workloads():
            best = check_invariants(db, w.key)
            assert best
        dense = db.find_workload("dense_small")[0]
        keys = {(k.ratio, k.interference) for k in check_invariants(db, dense)}
        assert keys == {(100.0, "none"), (50.0, "none"), (100.0, "memory"), (50.0, "memory")}
    # the summary says where each cell's best came from
    for summary in (tuned_db[1], tenancy_db[1]):
        assert summary.results and all(r.origin for r in summary.results)
        assert not summary.matrix_gaps


def test_neighbour_first_then_quiet_with_a_kill_in_the_matrix(tmp_path, demo_space, monkeypatch):
    """The other order: next to the memory neighbour first, then quiet. The quiet run is killed in
    the middle of its winners matrix; the same command again finishes it, measuring nothing twice."""
    from spatialtune.tuning import job as job_mod

    ws = demo_space.select(["dense_small"])
    path = tmp_path / "order.sqlite"
    opts = dict(trials=6, batch=6, population=64, confirm_top=0, baselines=False,
                run=RunSettings(repeat=3, min_repeat_ms=5))
    with TuningDatabase(path) as db:
        tune(ws, [50], db, TuneOptions(interference="memory", **opts))

    real = job_mod._Job.measure
    calls = {"matrix": 0}

    def killing(self, batch):
        if batch.purpose == "matrix":
            calls["matrix"] += 1
            if calls["matrix"] == 2:
                raise KeyboardInterrupt("killed in the winners matrix")
        return real(self, batch)

    monkeypatch.setattr(job_mod._Job, "measure", killing)
    with TuningDatabase(path) as db, pytest.raises(KeyboardInterrupt):
        tune(ws, [100, 50], db, TuneOptions(**opts))
    monkeypatch.setattr(job_mod._Job, "measure", real)
    with TuningDatabase(path) as db:
        rows = db.measurements()
        assert missing_winners(rows, TOP)  # the kill left part of the matrix unmeasured
        before = {(m.key, m.mod_hash) for m in rows}
        summary = tune(ws, [100, 50], db, TuneOptions(**opts))
        after = db.measurements()
        assert len(after) == len({(m.key, m.mod_hash) for m in after})  # nothing measured twice
        assert before <= {(m.key, m.mod_hash) for m in after}
        best = check_invariants(db, ws[0].key)
        assert {(k.ratio, k.interference) for k in best} == {(100.0, "none"), (50.0, "none"), (50.0, "memory")}
        assert all(r.origin for r in summary.results)
        origins = winner_origins(after)
        assert {o.kind for o in origins.values()} <= {"own", "share", "neighbour", "share+neighbour"}
