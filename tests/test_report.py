"""Reports: the numbers on a hand-built database (no plotting), then a real run's report with
every section, rendered by headless Chromium without broken images."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli
from dbutil import CPU, DENSE, meas, populate
from spatialtune.store.database import TuningDatabase
from spatialtune.report import write_report
from spatialtune.report.data import SECTIONS, compute_report
from spatialtune.workloads.spec import Workload

CONV = Workload.from_dict({"op": "conv2d", "dtype": "fp32", "name": "tiny_conv",
                           "params": {"N": 1, "C": 4, "H": 8, "W": 8, "K": 4, "R": 3, "S": 3, "pad": 1}})


@pytest.fixture
def hand_db(tmp_path):
    """DENSE: the 100 % best (h1) is 2x slower than the 50 % best (h2) at 50 %; 4 candidates at
    both shares in opposite order except the best. CONV: only 100 %. A compute run of DENSE."""
    path = tmp_path / "r.sqlite"
    with TuningDatabase(path) as db:
        populate(db)
        db.add_workload(CONV)
        at100 = {"h1": 1.0e-3, "h2": 1.5e-3, "h3": 2.0e-3, "h4": 3.0e-3}
        at50 = {"h1": 4.0e-3, "h2": 2.0e-3, "h3": 3.0e-3, "h4": 5.0e-3}
        for h, t in at100.items():
            db.record(meas(ratio=100, h=h, t=t, granted_units=8))
        for h, t in at50.items():
            db.record(meas(ratio=50, h=h, t=t, granted_units=4))
        db.record(meas(w=CONV, ratio=100, h="c1", t=1e-4))
        db.record(meas(ratio=50, h="h2", t=3.0e-3, interference="compute", neighbour_throughput=5e9,
                       neighbour_unit="FLOP/s"))
        db.record_baseline(DENSE.key, CPU.id, "cpu", 50, "none", "numpy", 2.5e-3, 4)
        db.record_baseline(DENSE.key, CPU.id, "cpu", 100, "none", "tvm-default", 9e-3, 8)
    return path


def test_report_data(hand_db):
    with TuningDatabase(hand_db) as db:
        d = compute_report(db)
    assert [s.label for s in d.series] == ["tiny_conv", "tiny_dense [compute]", "tiny_dense"]
    dense = d.series[2]
    p50, p100 = dense.points
    assert (p50.ratio, p50.tuned_s, p50.tuned_hash, p50.whole_config_s) == (50, 2e-3, "h2", 4e-3)
    assert p50.speedup == pytest.approx(2.0) and p100.speedup == pytest.approx(1.0)
    assert (p50.baseline_kind, p50.baseline_s, p100.baseline_s, p100.default_s) == ("numpy", 2.5e-3, None, 9e-3)
    assert p50.n_trials == 4 and p50.units == 4 and re.fullmatch(r"\d{4}-\d\d-\d\d", p50.tuned_date)
    # geometric means over the series that have both configs at that share
    assert d.geomean_speedup[50] == pytest.approx(2.0)
    assert d.geomean_speedup[100] == pytest.approx(1.0)
    assert d.regret_cols == [50, 100]
    assert d.device_names == {CPU.id: "Test CPU (cpu, 8 cores)"}  # a person reads names, not ids
    row = d.regret_rows.index("tiny_dense (Test CPU (cpu, 8 cores))")
    assert d.regret[row] == [pytest.approx(2.0), pytest.approx(1.0)]  # a time ratio (spatialtune.terms.regret)
    assert d.regret[d.regret_rows.index("tiny_conv (Test CPU (cpu, 8 cores))")] == [None, pytest.approx(1.0)]
    (c,) = [c for c in d.correlations if c.label == "tiny_dense"]
    # ranks at 100: h1<h2<h3<h4; at 50: h2<h3<h1<h4 -> d^2 = 4+1+1+0 = 6 -> rho = 1 - 36/60
    assert (c.ratio_a, c.ratio_b, c.n_common, c.same_best) == (50, 100, 4, False)
    assert c.rho == pytest.approx(1 - 6 * 6 / (4 * 15))
    (e,) = d.interference
    assert (e.label, e.ratio, e.condition, e.best_s, e.quiet_s) == ("tiny_dense", 50, "compute", 3e-3, 2e-3)
    assert e.slowdown == pytest.approx(1.5) and e.same_config and e.neighbour_throughput == 5e9
    assert d.devices[0]["id"] == CPU.id and d.date_range is not None


def _unchecked(ratio, h, t, interference="none"):
    """An imported MetaSchedule record as the importer stores it: timed, outputs never checked."""
    m = meas(ratio=ratio, h=h, t=t, status="unchecked", interference=interference, source="import")
    m.times, m.median_s, m.error = [t] * 3, t, ""
    return m


@pytest.fixture
def cells_db(tmp_path):
    """DENSE on CPU under four keys, rows in the order a run would store them: h1 found at 100 %,
    h2 at 100 % but best at 50 %, h3 found by 50 % next to the memory neighbour, h1 best at
    100 % next to it too. Unchecked imports under 50 % (one faster than the checked best, one
    slower) and under 25 % (no checked row). numpy beats the tuned best only at 50 % quiet; a
    faster TVM default at 100 % memory is no vendor library."""
    path = tmp_path / "cells.sqlite"
    with TuningDatabase(path) as db:
        populate(db)
        for ratio, cond, h, t in [(100, "none", "h1", 1.0e-3), (100, "none", "h2", 1.2e-3),
                                  (50, "none", "h2", 2.0e-3), (50, "none", "h1", 2.6e-3),
                                  (50, "memory", "h3", 2.5e-3), (50, "memory", "h1", 4.0e-3),
                                  (50, "memory", "h2", 3.0e-3), (100, "memory", "h1", 1.5e-3),
                                  (100, "memory", "h2", 1.8e-3)]:
            db.record(meas(ratio=ratio, h=h, t=t, interference=cond, source="tune"))
        db.record(_unchecked(50, "u1", 1.0e-3))
        db.record(_unchecked(50, "u2", 5.0e-3))
        db.record(_unchecked(25, "u3", 1.0e-3))
        db.record_baseline(DENSE.key, CPU.id, "cpu", 50, "none", "numpy", 1.5e-3, 4)
        db.record_baseline(DENSE.key, CPU.id, "cpu", 100, "none", "numpy", 2.0e-3, 8)
        db.record_baseline(DENSE.key, CPU.id, "cpu", 100, "memory", "tvm-default", 0.5e-3, 8)
    return path


def test_cells_say_where_their_winner_came_from_and_where_the_vendor_wins(cells_db, tmp_path):
    with TuningDatabase(cells_db) as db:
        d = compute_report(db)
    cells = {(c.ratio, c.condition): c for c in d.tenancy.cells}
    assert set(cells) == {(100, "none"), (100, "memory"), (50, "none"), (50, "memory")}
    assert {k: c.origin for k, c in cells.items()} == {
        (100, "none"): "own search", (100, "memory"): "from quiet", (50, "none"): "from 100%",
        (50, "memory"): "own search"}
    # the unchecked u1 (1.0 ms) is faster than h2 (2.0 ms) at 50 %, and still not the best
    assert cells[(50, "none")].best_hash == "h2" and cells[(50, "none")].best_s == 2.0e-3
    assert (cells[(50, "none")].unchecked, cells[(50, "none")].unchecked_faster) == (2, 1)
    assert [k for k, c in cells.items() if c.vendor_faster] == [(50, "none")]
    assert cells[(100, "none")].baseline_kind == "numpy" and not cells[(100, "none")].vendor_faster
    assert cells[(100, "memory")].baseline_s is None  # a TVM default is not the vendor library
    (w,) = d.tenancy.workloads
    assert (w.cells, w.vendor_faster, w.unchecked, w.unchecked_faster) == (4, 1, 3, 2)
    assert w.unchecked_only == ["cpu 25% none"]
    # no unchecked row is a best anywhere in the report, nor makes a share of its own
    assert {(p.ratio, p.tuned_hash) for s in d.series if s.interference == "none" for p in s.points} == {
        (100, "h1"), (50, "h2")}
    with TuningDatabase(cells_db) as db:
        md = write_report(db, tmp_path / "out")[0].read_text()
    lead = md[:md.index("## Devices")]
    assert "from quiet" in lead and "the vendor library is faster than the tuned best in 1" in lead
    assert lead.count("vendor faster") >= 2 and "2 unchecked, 1 faster (not used)" in lead
    assert "3 unchecked rows" in lead and "cpu 25% none" in lead and "Test CPU (cpu, 8 cores)" in lead


def test_report_of_an_empty_database_says_so(tmp_path):
    with TuningDatabase(tmp_path / "e.sqlite") as db:
        paths = write_report(db, tmp_path / "out")
    md = paths[0].read_text()
    for s in SECTIONS:
        assert f"## {s}" in md
    assert "No workload was measured at two shares" in md


# ---------------------------------------------------------------- a real run, rendered


def _chromium_install_note() -> str | None:
    """None when chromium is usable; otherwise why not (after trying to install it)."""
    if shutil.which("chromium") or Path("/usr/bin/chromium").exists():
        return None
    if os.geteuid() != 0:
        return "chromium is not installed and we are not root to apt-get install it"
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                           env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"})
        if p.returncode != 0:
            return f"chromium could not be installed ({' '.join(cmd)}: {p.stderr.strip()[-200:]})"
    return None if Path("/usr/bin/chromium").exists() else "apt-get installed no /usr/bin/chromium"


@pytest.fixture(scope="session")
def chromium():
    why = _chromium_install_note()
    if why:
        pytest.skip(why)
    return shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="session")
def real_report(tenancy_db, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    p = run_cli("report", "--db", tenancy_db[0], "--out", out, check=True)
    return out, p.stdout.split()


def test_every_deployment_cell_is_measured_and_its_factors_come_from_the_rows(tenancy_db):
    """dense_small tuned quiet and next to the memory neighbour at 100 % and 50 %: all four cells
    exist, nothing is missing, and regret and factors are the stored times recomputed here."""
    from spatialtune.report.tenancy import deployment_cells

    path, _ = tenancy_db
    with TuningDatabase(path, create=False) as db:
        (wk,) = db.find_workload("dense_small")
        t = deployment_cells(db, wk)
        times = {}
        for m in db.measurements(workload_key=wk, status="ok"):
            times[(m.ratio, m.interference, m.mod_hash)] = m.median_s
        best = {(b.ratio, b.interference): b for b in db.best(workload_key=wk)}
        numpy = {(b["ratio"], b["interference"]): b["median_s"] for b in db.baselines(workload_key=wk)
                 if b["kind"] == "numpy"}
    assert {(c.ratio, c.condition) for c in t.cells} == {(r, i) for r in (100.0, 50.0) for i in ("none", "memory")}
    ordinary = best[(100.0, "none")].mod_hash
    for c in t.cells:
        assert not c.missing, c.missing
        quiet = best[(c.ratio, "none")].mod_hash
        here = best[(c.ratio, c.condition)]
        assert c.best_s == here.median_s
        assert c.regret == pytest.approx(times[(c.ratio, c.condition, ordinary)] / here.median_s)
        assert c.share_alone == pytest.approx(times[(c.ratio, "none", ordinary)] / best[(c.ratio, "none")].median_s)
        if c.condition == "memory":
            assert c.neighbour_alone == pytest.approx(times[(c.ratio, "memory", quiet)] / here.median_s)
        assert c.baseline_kind == "numpy" and c.vs_baseline == pytest.approx(numpy[(c.ratio, c.condition)] / c.best_s)
    assert set(t.geomean_by_condition) == {"none", "memory"} and set(t.geomean_by_share) == {100.0, 50.0}


def test_report_leads_with_the_comparison_and_exports_it(real_report, tenancy_db):
    out, printed = real_report
    md = (out / "report.md").read_text()
    assert md.index(f"## {SECTIONS[0]}") < md.index("## Devices")
    heat = sorted(out.glob("plots/regret_*.png"))  # one heat map per workload and device
    assert [p.name[10:] for p in heat] == ["conv_small.png", "dense_small.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in heat)
    p = run_cli("report", "--db", tenancy_db[0], "--json", check=True)
    d = json.loads(p.stdout)
    cells = [c for c in d["tenancy"]["cells"] if c["name"] == "dense_small"]
    assert len(cells) == 4 and all(c["regret"] and c["origin"] for c in cells)
    assert {w["name"] for w in d["tenancy"]["workloads"]} == {"dense_small", "conv_small"}
    p = run_cli("compare", "--db", tenancy_db[0], "--workload", "dense_small", check=True)
    assert "memory" in p.stdout and "regret" in p.stdout.splitlines()[0] and "missing" not in p.stdout


def test_real_report_has_every_section(real_report, tenancy_db):
    out, printed = real_report
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for s in SECTIONS:
        assert f"## {s}" in md
        assert f"<h2>{s.replace('&', '&amp;')}</h2>" in page
    with TuningDatabase(tenancy_db[0], create=False) as db:
        dev = db.devices()[0]
        best = db.best()
        assert dev["id"] in md and dev["name"] in md
        # every best time of the database is in the report, as the report formats it
        for b in best:
            assert f"{b.median_s * 1e6:.1f} µs" in md
            assert b.updated_at[:10] in md
    pngs = sorted(out.glob("plots/*.png"))
    assert len(pngs) >= 3 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert {str(p) for p in pngs} <= set(printed)
    # self-contained: every image is inline, nothing is fetched
    assert page.count("<img") == page.count("src='data:image/png;base64,") >= 3
    assert "http://" not in page and "https://" not in page


# Measured in the page once it has loaded: every image decoded, the page no wider than the window,
# the elements that stick out past its right edge, and the width each heat map is shown at.
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const out = {inner: window.innerWidth, scroll: document.documentElement.scrollWidth,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt), images: imgs.length,
    wider: [...document.body.querySelectorAll('*')].filter(e => e.getBoundingClientRect().right > window.innerWidth)
      .map(e => e.tagName + ':' + (e.textContent || e.alt || '').slice(0, 40)),
    heatmaps: imgs.filter(i => i.classList.contains('wide')).map(i => [i.alt, i.getBoundingClientRect().width]),
    titles: [...document.querySelectorAll('[title]')].map(e => e.title)};
  document.body.setAttribute('data-probe', JSON.stringify(out)); });</script></body>"""


def _measure_at_1400(chromium, page: Path, tmp_path: Path) -> tuple[dict, list]:
    """PROBE's measurements of ``page`` in headless Chromium 1400 px wide, and the command line."""
    import html

    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE))
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'ud'}", "--window-size=1400,900", "--virtual-time-budget=5000"]
    p = subprocess.run(base + ["--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    m = re.search(r'data-probe="([^"]*)"', p.stdout)
    assert m, f"the probe did not run: {p.stdout[:500]} {p.stderr[-1000:]}"
    return json.loads(html.unescape(m.group(1))), base


def test_a_report_with_every_table_fits_a_laptops_width(cells_db, chromium, tmp_path):
    """The widest tables (models end to end has 15 columns, with long model and task names) wrap
    within 1400 px; the vendor-faster cells are marked in the page."""
    from spatialtune.store.model_runs import VARIANTS, ModelRun, record_model_run

    with TuningDatabase(cells_db) as db:
        for r in (100, 50):
            for v, t in zip(VARIANTS, (1.1e-3, 1.3e-3, 9.0e-3, 1.2e-3)):
                record_model_run(db, ModelRun(
                    "run1", "resnet50-v1-12-fp32-batch1-opset17", "abcdef0123456789", CPU.id, "cpu", r, v, "ok",
                    granted_units=8 * r // 100, latency_s=t, tuned_tasks=23, n_tasks=25, trials=12345,
                    detail={"tasks": {"t7": {"name": "fused_nn_conv2d_add_nn_relu_7_layer4_block2", "weight": 3,
                                             "time_s": 1e-4}}}))
        write_report(db, tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    assert "resnet50-v1-12-fp32-batch1-opset17" in page and page.count("class='vendor'") == 2
    got, _ = _measure_at_1400(chromium, tmp_path / "out" / "report.html", tmp_path)
    assert got["inner"] == 1400 and not got["broken"], got
    assert got["scroll"] <= got["inner"] and not got["wider"], got["wider"]
    assert [w >= 600 for _, w in got["heatmaps"]] == [True, True], got["heatmaps"]  # the lead's and section 4's


def test_report_html_renders_in_chromium_at_a_laptops_width(real_report, chromium, tmp_path, tenancy_db):
    """At 1400 px wide: every image loads, nothing is wider than the window (tables wrap), every
    deployment heat map (one per workload and device) is shown at least 600 px wide, and devices
    show by name with their ids on hover."""
    out, _ = real_report
    page = (out / "report.html").read_text()
    got, base = _measure_at_1400(chromium, out / "report.html", tmp_path)
    assert got["inner"] == 1400, got["inner"]
    assert not got["broken"] and got["images"] == page.count("<img"), got
    assert got["scroll"] <= got["inner"] and not got["wider"], got["wider"]
    with TuningDatabase(tenancy_db[0], create=False) as db:
        d = compute_report(db)
        dev = db.devices()[0]
    leads = list(d.tenancy.workloads)
    shown = {alt: w for alt, w in got["heatmaps"] if alt.startswith("deployment regret of ")}
    assert len(shown) == len(leads) >= 2, got["heatmaps"]
    assert all(w >= 600 for _, w in got["heatmaps"]), got["heatmaps"]
    assert dev["id"] in got["titles"] and d.device_names[dev["id"]].startswith(dev["name"])
    # the screenshot a person looks at: the same page, 1400 px wide
    shot = tmp_path / "report-1400.png"
    p = subprocess.run(base + [f"--screenshot={shot}", (out / "report.html").as_uri()], capture_output=True,
                       text=True, timeout=120)
    head = shot.read_bytes()[:24]
    assert p.returncode == 0 and head[:8] == b"\x89PNG\r\n\x1a\n", p.stderr[-2000:]
    assert int.from_bytes(head[16:20], "big") == 1400
