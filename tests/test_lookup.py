"""Runtime lookup: the fallback rules on a hand-built database, reloads, concurrency, the CLI,
and applying a found config from a real tuning run."""

import json
import shutil
import sqlite3
import threading

import pytest

from conftest import ROOT, run_cli
from dbutil import CPU, DENSE, GPU, meas, populate
from spatialtune.store.database import TuningDatabase
from spatialtune.errors import ConfigError
from spatialtune.lookup import Lookup, get_lookup, key_for
from spatialtune.workloads.spec import Workload

ONLY_HALF = Workload(op="dense", dtype="fp32", params={"M": 8, "N": 8, "K": 8}, name="only_half")


@pytest.fixture
def hand_db(tmp_path):
    """DENSE on CPU (8 cores): 25/50/100 % alone, 50 % under compute; ONLY_HALF: 50 % only."""
    path = tmp_path / "hand.sqlite"
    with TuningDatabase(path) as db:
        populate(db)
        db.add_workload(ONLY_HALF)
        for r, t in ((25, 4e-3), (50, 2e-3), (100, 1e-3)):
            db.record(meas(ratio=r, h=f"h{r}", t=t, granted_units=int(8 * r / 100)))
            db.record(meas(ratio=r, h=f"slow{r}", t=t * 3))
        db.record(meas(ratio=50, h="hc50", t=5e-3, interference="compute"))
        db.record(meas(w=ONLY_HALF, ratio=50, h="o50", t=1e-4))
    return path


def test_exact_below_above_and_miss(hand_db):
    with Lookup(hand_db, here=[CPU.id]) as lk:
        r = lk.lookup(DENSE.key, ratio=50)
        assert (r.match, r.tuned_ratio, r.mod_hash, r.median_s, r.found) == ("exact", 50, "h50", 2e-3, True)
        assert r.n_trials == 2 and r.tuned_units == 4 and r.device_id == CPU.id and r.partition == "cpu"
        assert r.checked and not r.other_device and r.prefer is None
        r = lk.lookup(DENSE.key, ratio=75)
        assert (r.match, r.tuned_ratio, r.mod_hash) == ("below", 50, "h50")
        assert "below 75%" in r.reason
        # nothing at or below 12.5 %: the nearest share above (2 cores), not the 8-core config
        r = lk.lookup(DENSE.key, ratio=12.5)
        assert (r.match, r.tuned_ratio, r.mod_hash) == ("above", 25, "h25")
        assert "nearest above is 25%" in r.reason
        assert lk.lookup(DENSE.key, units=1).mod_hash == "h25"  # 1 core: the 2-core kernel
        r = lk.lookup(DENSE.key, ratio=100)
        assert (r.match, r.mod_hash) == ("exact", "h100")
        # a workload tuned only above the share and never at 100 %: the share above answers
        r = lk.lookup("only_half", ratio=25)
        assert (r.match, r.tuned_ratio, r.mod_hash) == ("above", 50, "o50")
        assert lk.lookup("only_half", ratio=60).match == "below"
        r = lk.lookup("no_such_workload", ratio=50)
        assert r.match == "miss" and not r.found and "not in the database" in r.reason
        assert r.mod_hash is None and r.median_s is None
        assert lk.trace(r) is None
        assert lk.trace(lk.lookup(DENSE.key, ratio=50)) == "trace-h50"


def test_the_callers_device_by_default(hand_db):
    """A database tuned on another machine answers a miss that names its devices, unless the
    caller names the device or allows any; the answer then says it is another device's."""
    with Lookup(hand_db, here=["cpu-elsewhere"]) as lk:
        r = lk.lookup(DENSE.key, ratio=50)
        assert r.match == "miss" and CPU.id in r.reason and "Test CPU" in r.reason and "any_device" in r.reason
        r = lk.lookup(DENSE.key, ratio=50, device=CPU.id)
        assert r.mod_hash == "h50" and r.other_device and "not of this machine" in r.reason
    with Lookup(hand_db, here=["cpu-elsewhere"], any_device=True) as lk:
        r = lk.lookup(DENSE.key, ratio=50)
        assert r.mod_hash == "h50" and r.other_device
    # by default the machine is detected: this test machine is not the hand-made "Test CPU"
    with Lookup(hand_db) as lk:
        r = lk.lookup(DENSE.key, ratio=50)
        assert r.match == "miss" and CPU.id in r.reason


def test_unchecked_rows_are_no_answer_unless_asked(hand_db):
    """An imported config never run through the output check is not served, even when faster."""
    with TuningDatabase(hand_db) as db:
        db.record(meas(ratio=50, h="imp50", t=1e-4, status="unchecked"))
        db.record(meas(ratio=50, h="bad50", status="build_error"))  # a trial too, never an answer
        db.record(meas(w=ONLY_HALF, ratio=100, h="imp100", t=1e-4, status="unchecked"))
        # measured here with the check: the row is replaced in place and becomes an answer
        db.record(meas(ratio=25, h="imp25", t=1e-4, status="unchecked"))
        db.record(meas(ratio=25, h="imp25", t=3e-3))
        rows = db.measurements(workload_key=DENSE.key, ratio=25)
        assert [(m.mod_hash, m.status) for m in rows if m.mod_hash == "imp25"] == [("imp25", "ok")]
    with Lookup(hand_db, here=[CPU.id]) as lk:
        assert lk.lookup(DENSE.key, ratio=50).mod_hash == "h50"
        assert lk.lookup(DENSE.key, ratio=25).mod_hash == "imp25"
        assert lk.lookup("only_half", ratio=100).mod_hash == "o50"
    with Lookup(hand_db, here=[CPU.id], include_unchecked=True) as lk:
        r = lk.lookup(DENSE.key, ratio=50)
        assert (r.mod_hash, r.checked) == ("imp50", False) and "never output-checked" in r.reason
        assert r.n_trials == 4  # every row of the key, as the best table counts them
        assert lk.lookup(DENSE.key, ratio=25).checked


def test_a_faster_vendor_library_is_said(hand_db):
    with TuningDatabase(hand_db) as db:
        db.record_baseline(DENSE.key, CPU.id, "cpu", 50, "none", "numpy", 1e-3)
        db.record_baseline(DENSE.key, CPU.id, "cpu", 100, "none", "numpy", 5e-3)
        db.record_baseline(DENSE.key, CPU.id, "cpu", 100, "none", "tvm-default", 1e-6)  # not a vendor library
    with Lookup(hand_db, here=[CPU.id]) as lk:
        r = lk.lookup(DENSE.key, ratio=50)
        assert (r.mod_hash, r.prefer, r.vendor, r.vendor_s, r.median_s) == ("h50", "vendor", "numpy", 1e-3, 2e-3)
        assert "numpy measured faster" in r.reason
        r = lk.lookup(DENSE.key, ratio=100)
        assert (r.prefer, r.vendor, r.vendor_s) == (None, "numpy", 5e-3)
        assert lk.lookup(DENSE.key, ratio=25).vendor is None


def test_interference_falls_back_to_quiet_configs(hand_db):
    with Lookup(hand_db, here=[CPU.id]) as lk:
        r = lk.lookup(DENSE.key, ratio=50, interference="compute")
        assert (r.match, r.interference, r.mod_hash) == ("exact", "compute", "hc50")
        r = lk.lookup(DENSE.key, ratio=75, interference="compute")
        assert (r.match, r.interference, r.mod_hash) == ("below", "compute", "hc50")
        # nothing under compute at or below 25 %, no 100 % compute config: the quiet rules answer
        r = lk.lookup(DENSE.key, ratio=25, interference="compute")
        assert (r.match, r.interference, r.mod_hash) == ("exact", "none", "h25")
        assert "under 'compute'" in r.reason
        r = lk.lookup(DENSE.key, ratio=50, interference="memory")
        assert (r.interference, r.requested_interference, r.mod_hash) == ("none", "memory", "h50")
        assert "nothing tuned under interference 'memory'" in r.reason


def test_units_spec_names_and_arguments(hand_db):
    with Lookup(hand_db, here=[CPU.id]) as lk:
        r = lk.lookup(DENSE, units=2)  # 2 of 8 cores = 25 %
        assert (r.match, r.requested_ratio, r.mod_hash) == ("exact", 25, "h25")
        assert lk.lookup("tiny_dense", units=3).mod_hash == "h25"  # 37.5 % -> below
        assert lk.lookup(key_for("dense", {"M": 4, "N": 8, "K": 16}), units=8).mod_hash == "h100"
        for bad in (dict(ratio=0), dict(ratio=150), dict(ratio=50, units=2), dict(), dict(units=0)):
            with pytest.raises(ConfigError):
                lk.lookup(DENSE.key, **bad)


def test_devices_and_partitions_must_be_unambiguous(hand_db):
    with TuningDatabase(hand_db) as db:
        db.add_device(GPU)
        db.record(meas(dev=GPU, ratio=50, h="g50", t=1e-5, partition="mps"))
    with Lookup(hand_db, any_device=True) as lk:
        r = lk.lookup(DENSE.key, ratio=50)
        assert r.match == "miss" and "several devices" in r.reason and GPU.id in r.reason
        assert lk.lookup(DENSE.key, ratio=50, device=CPU.id).mod_hash == "h50"
        r = lk.lookup(DENSE.key, units=66, device=GPU.id)  # 66 of 132 SMs
        assert (r.match, r.mod_hash, r.partition) == ("exact", "g50", "mps")
        assert lk.lookup(DENSE.key, ratio=50, device=GPU.id, partition="green").match == "miss"
        assert "not tuned on device nope" in lk.lookup(DENSE.key, ratio=50, device="nope").reason
        assert lk.lookup(DENSE.key, units=4).match == "miss"  # units without a unique device


def test_refresh_sees_writes_and_replaced_files(hand_db, tmp_path):
    with Lookup(hand_db, check_interval_s=None, here=[CPU.id]) as lk:
        assert lk.lookup(DENSE.key, ratio=50).mod_hash == "h50"
        assert lk.refresh() is False
        old = lk.index
        with TuningDatabase(hand_db) as db:
            db.record(meas(ratio=50, h="better50", t=1e-3))
        # no auto-check: the snapshot stands until refresh
        assert lk.lookup(DENSE.key, ratio=50).mod_hash == "h50"
        assert lk.refresh() is True and lk.index is not old
        assert lk.lookup(DENSE.key, ratio=50).mod_hash == "better50"
        # a database built elsewhere (a merge) copied over the live one with SQLite's backup API;
        # os.replace would leave the live file's WAL behind for the new file to pick up
        other = tmp_path / "other.sqlite"
        with TuningDatabase(other) as db:
            populate(db)
            db.record(meas(ratio=50, h="fromother", t=1e-3))
        src, dst = sqlite3.connect(other), sqlite3.connect(hand_db)
        src.backup(dst)
        src.close()
        dst.close()
        assert lk.refresh() is True
        assert lk.lookup(DENSE.key, ratio=50).mod_hash == "fromother"
        assert lk.lookup("only_half", ratio=50).reason.endswith("not in the database")


def test_auto_check_interval(hand_db):
    with Lookup(hand_db, check_interval_s=0, here=[CPU.id]) as lk:
        assert lk.lookup(DENSE.key, ratio=50).mod_hash == "h50"
        with TuningDatabase(hand_db) as db:
            db.record(meas(ratio=50, h="better50", t=1e-3))
        assert lk.lookup(DENSE.key, ratio=50).mod_hash == "better50"


def test_get_lookup_is_per_process(hand_db):
    assert get_lookup(hand_db) is get_lookup(str(hand_db))


def test_concurrent_lookups_while_the_database_is_rewritten(hand_db):
    """8 readers against one Lookup while a writer keeps improving the 50 % config: every answer
    is a committed state (hash and time belong together), and each reader only moves forward."""
    n_writes = 60
    times = {f"w{k}": 1e-3 / (k + 2) for k in range(n_writes)}
    errors: list[BaseException] = []
    stop = threading.Event()
    lk = Lookup(hand_db, check_interval_s=0.0, here=[CPU.id])
    seen_final = []

    def reader():
        try:
            last = -1
            while not stop.is_set():
                r = lk.lookup(DENSE.key, ratio=75)
                assert r.match == "below" and r.tuned_ratio == 50
                if r.mod_hash == "h50":
                    k = -1
                    assert r.median_s == 2e-3
                else:
                    k = int(r.mod_hash[1:])
                    assert r.median_s == pytest.approx(times[r.mod_hash], rel=0, abs=0)
                assert k >= last, f"went back from w{last} to {r.mod_hash}"
                last = k
                assert lk.lookup(DENSE.key, ratio=100).mod_hash == "h100"
            seen_final.append(last)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    with TuningDatabase(hand_db) as db:
        for k in range(n_writes):
            db.record(meas(ratio=50, h=f"w{k}", t=times[f"w{k}"]))
            if errors:
                break
    lk.refresh()
    final = lk.lookup(DENSE.key, ratio=75)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    lk.close()
    assert not errors, errors[0]
    assert final.mod_hash == f"w{n_writes - 1}"
    assert len(seen_final) == 8


def test_cli_prints_the_answer_as_json(hand_db, tmp_path):
    p = run_cli("lookup", "--db", hand_db, "--workload", "tiny_dense", "--ratio", "75", check=True)
    d = json.loads(p.stdout)
    assert d["found"] is False and CPU.id in d["reason"]  # not this machine's database
    p = run_cli("lookup", "--db", hand_db, "--workload", "tiny_dense", "--ratio", "75", "--any-device", check=True)
    d = json.loads(p.stdout)
    assert (d["match"], d["tuned_ratio"], d["mod_hash"], d["found"], d["other_device"]) == ("below", 50, "h50",
                                                                                            True, True)
    p = run_cli("lookup", "--db", hand_db, "--workload", "nothing", "--ratio", "25", "--trace", "--device", CPU.id,
                check=True)
    d = json.loads(p.stdout)
    assert d["found"] is False and d["trace"] is None and d["reason"]
    p = run_cli("lookup", "--db", tmp_path / "absent.sqlite", "--workload", "x", "--ratio", "50")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "no such database" in p.stderr
    p = run_cli("lookup", "--db", hand_db, "--workload", "x", "--ratio", "500")
    assert p.returncode == 2 and "ratio must be a percentage" in p.stderr


def test_applied_config_passes_the_reference_check(tuned_db, tmp_path):
    """A found config, rebuilt from its stored trace, is the kernel that was measured and
    computes the right answer; a miss builds TVM's default schedule."""
    from spatialtune.lookup.apply import build_kernel, check_kernel
    from spatialtune.workloads.schedule import apply_trace as replay_trace
    from spatialtune.workloads.schedule import mod_hash

    path = tmp_path / "copy.sqlite"
    shutil.copy(tuned_db[0], path)
    with Lookup(path) as lk, TuningDatabase(path, create=False) as db:
        for name in ("dense_small", "conv_small"):
            for ratio in (50, 75, 100):
                r = lk.lookup(name, ratio=ratio)
                assert r.found and r.match == ("below" if ratio == 75 else "exact")
                w = db.workload(r.workload_key)
                trace = lk.trace(r)
                assert mod_hash(replay_trace(w, trace).mod) == r.mod_hash
                k = build_kernel(r, w, trace)
                assert k.tuned and check_kernel(k) < 1e-4
        miss = lk.lookup("dense_small", ratio=50, interference="none", partition="mps")
        assert not miss.found
        k = build_kernel(miss, db.workload(db.find_workload("dense_small")[0]), None)
        assert not k.tuned and check_kernel(k) < 1e-4


def test_units_mean_what_the_share_granted_on_the_shipped_h200_data(tmp_path):
    """MPS 25 % on the H200 gives a client 32 SMs, MPS 12 % gives 14: a scheduler that granted 32
    SMs gets the 25 % config, 14 SMs the 12 % one (before, units became a fraction of the device
    compared with the ratio asked: 32 SMs answered with the 12 % config, 14 with 100 %)."""
    db = tmp_path / "shipped.sqlite"
    shutil.copy(ROOT / "tuning_db" / "spatialtune.sqlite", db)
    with Lookup(db, check_interval_s=None, any_device=True) as lk:
        w = "matmul_fp32_M1024_N1024_K1024"
        for units, ratio, tuned_units, match in ((32, 25.0, 32, "exact"), (14, 12.0, 14, "exact"),
                                                 (66, 50.0, 66, "exact"), (40, 25.0, 32, "below"),
                                                 (132, 100.0, 132, "exact")):
            r = lk.lookup(w, units=units, partition="mps")
            assert (r.match, r.tuned_ratio, r.tuned_units, r.requested_units) == (match, ratio, tuned_units, units)
        # a green context asked as 25 % is a 32-SM context: the same key as green:32sm
        assert lk.lookup(w, units=32, partition="green").tuned_ratio == 24.2424
        assert lk.lookup(w, ratio=24.2424, partition="green").match == "exact"
