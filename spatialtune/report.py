"""Reports: what tuning for a share buys, computed from the database, then rendered.

:func:`compute_report` reads a :class:`~spatialtune.database.TuningDatabase` into plain
dataclasses (:class:`ReportData`); :func:`render` turns those into ``report.md``, a self-contained
``report.html`` (plots inlined as base64 PNG) and the PNG files. Tests check the data without
plotting. Every number comes from the database and carries the device it was measured on and the
date of the measurement.

Definitions, per series (one workload on one device, partition and interference condition):

- *ratio-tuned*: the best config measured at share r (``best``);
- *100 %-tuned*: the config that is best at 100 %, as measured at share r (same ``mod_hash``);
- *speedup* at r: 100 %-tuned time / ratio-tuned time (> 1: tuning for the share paid off);
- *regret* at r: speedup − 1, what deploying the whole-device config at r costs, in percent;
- *rank correlation* between shares a and b: Spearman's rho of the times of the candidates
  measured at both (same ``mod_hash``), when at least 3 are;
- *interference effect* at r: best time under the condition / best time with no neighbour.
"""

from __future__ import annotations

import base64
import html
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .database import TuningDatabase, norm_ratio

log = logging.getLogger(__name__)

VENDOR_BASELINES = {"cpu": ("numpy",), "cuda": ("cublas", "torch")}
MIN_COMMON = 3
SECTIONS = ("Devices", "Time vs share", "Speedup of ratio-tuned over 100%-tuned", "Regret heat map",
            "Rank correlation between shares", "Interference")


@dataclass
class SharePoint:
    ratio: float
    units: int | None
    tuned_s: float
    tuned_hash: str
    tuned_date: str  # when the best measurement was taken
    n_trials: int
    whole_config_s: float | None  # the 100%-best config measured at this share
    whole_config_date: str | None
    baseline_kind: str | None  # vendor baseline (numpy / cuBLAS) under the same cap
    baseline_s: float | None
    baseline_date: str | None
    default_s: float | None  # TVM's untuned default schedule

    @property
    def speedup(self) -> float | None:
        return self.whole_config_s / self.tuned_s if self.whole_config_s else None


@dataclass
class Series:
    workload_key: str
    name: str
    device_id: str
    partition: str
    interference: str
    points: list[SharePoint] = field(default_factory=list)  # ascending ratio

    @property
    def label(self) -> str:
        base = self.name or self.workload_key
        return base if self.interference == "none" else f"{base} [{self.interference}]"


@dataclass
class Correlation:
    label: str
    device_id: str
    ratio_a: float
    ratio_b: float
    n_common: int
    rho: float | None  # None when fewer than MIN_COMMON common candidates
    same_best: bool  # the same kernel is best at both shares


@dataclass
class InterferenceEffect:
    label: str  # workload name
    device_id: str
    ratio: float
    condition: str
    best_s: float
    quiet_s: float  # best with no neighbour, same share
    slowdown: float
    neighbour_throughput: float | None  # median over the condition's measurements
    neighbour_unit: str
    same_config: bool
    date: str


@dataclass
class ReportData:
    db_path: str
    generated_at: str
    devices: list[dict[str, Any]]
    date_range: tuple[str, str] | None
    series: list[Series]
    geomean_speedup: dict[float, float]  # share -> geometric mean over series with both configs
    regret_rows: list[str]
    regret_cols: list[float]
    regret: list[list[float | None]]  # rows x cols, fraction (0.1 = 10 % slower)
    correlations: list[Correlation]
    interference: list[InterferenceEffect]


# ---------------------------------------------------------------- compute


def _day(ts: str | None) -> str:
    return (ts or "")[:10]


def compute_report(db: TuningDatabase) -> ReportData:
    """Read everything the report shows from ``db``. Pure data; no plotting."""
    from scipy.stats import spearmanr

    names = db.workload_names()
    devices = db.devices()
    dev_kind = {d["id"]: d["kind"] for d in devices}
    groups: dict[tuple, list] = {}
    for b in db.best():
        groups.setdefault((b.workload_key, b.device_id, b.partition, b.interference), []).append(b)
    series: list[Series] = []
    correlations: list[Correlation] = []
    ok_by_group: dict[tuple, dict[float, dict[str, Any]]] = {}
    dates: list[str] = []
    for gk in sorted(groups):
        wkey, dev, part, interf = gk
        ms = db.measurements(workload_key=wkey, device_id=dev, partition=part, interference=interf, status="ok")
        by_ratio: dict[float, dict[str, Any]] = {}
        for m in ms:
            by_ratio.setdefault(norm_ratio(m.ratio), {})[m.mod_hash] = m
        ok_by_group[gk] = by_ratio
        bests = {norm_ratio(b.ratio): b for b in groups[gk]}
        whole = bests.get(100.0)
        base = {}
        for row in db.baselines(workload_key=wkey, device_id=dev, partition=part, interference=interf):
            base[(norm_ratio(row["ratio"]), row["kind"])] = row
        s = Series(wkey, names.get(wkey, ""), dev, part, interf)
        for r in sorted(bests):
            b = bests[r]
            tm = by_ratio.get(r, {}).get(b.mod_hash)
            wm = by_ratio.get(r, {}).get(whole.mod_hash) if whole else None
            vendor = next((base[(r, k)] for k in VENDOR_BASELINES.get(dev_kind.get(dev, ""), ()) if (r, k) in base),
                          None)
            default = base.get((r, "tvm-default"))
            p = SharePoint(r, b.granted_units, b.median_s, b.mod_hash, _day(tm.created_at if tm else b.updated_at),
                           b.n_trials, wm.median_s if wm else None, _day(wm.created_at) if wm else None,
                           vendor["kind"] if vendor else None, vendor["median_s"] if vendor else None,
                           _day(vendor["created_at"]) if vendor else None,
                           default["median_s"] if default else None)
            dates += [d for d in (p.tuned_date, p.whole_config_date, p.baseline_date) if d]
            s.points.append(p)
        series.append(s)
        for ra, rb in itertools.combinations(sorted(by_ratio), 2):
            common = sorted(set(by_ratio[ra]) & set(by_ratio[rb]))
            rho = None
            if len(common) >= MIN_COMMON:
                v = spearmanr([by_ratio[ra][h].median_s for h in common], [by_ratio[rb][h].median_s for h in common])
                rho = None if math.isnan(v.statistic) else float(v.statistic)
            same = ra in bests and rb in bests and bests[ra].mod_hash == bests[rb].mod_hash
            correlations.append(Correlation(s.label, dev, ra, rb, len(common), rho, same))

    logs: dict[float, list[float]] = {}
    for s in series:
        for p in s.points:
            if p.speedup:
                logs.setdefault(p.ratio, []).append(math.log(p.speedup))
    geo = {r: math.exp(sum(v) / len(v)) for r, v in sorted(logs.items())}

    cols = sorted({p.ratio for s in series for p in s.points})
    rows = [f"{s.label} ({s.device_id})" for s in series]
    grid = [[next((p.speedup - 1 for p in s.points if p.ratio == c and p.speedup), None) for c in cols]
            for s in series]

    effects: list[InterferenceEffect] = []
    quiet = {(s.workload_key, s.device_id, s.partition): s for s in series if s.interference == "none"}
    for s in series:
        q = quiet.get((s.workload_key, s.device_id, s.partition))
        if s.interference == "none" or q is None:
            continue
        qp = {p.ratio: p for p in q.points}
        for p in s.points:
            if p.ratio not in qp:
                continue
            ms = ok_by_group[(s.workload_key, s.device_id, s.partition, s.interference)].get(p.ratio, {}).values()
            thr = sorted(m.neighbour_throughput for m in ms if m.neighbour_throughput is not None)
            unit = next((m.neighbour_unit for m in ms if m.neighbour_unit), "")
            effects.append(InterferenceEffect(s.name or s.workload_key, s.device_id, p.ratio, s.interference,
                                              p.tuned_s, qp[p.ratio].tuned_s, p.tuned_s / qp[p.ratio].tuned_s,
                                              thr[len(thr) // 2] if thr else None, unit,
                                              p.tuned_hash == qp[p.ratio].tuned_hash, p.tuned_date))
    return ReportData(str(db.path), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), devices,
                      (min(dates), max(dates)) if dates else None, series, geo, rows, cols, grid, correlations,
                      effects)


# ---------------------------------------------------------------- render


def _us(x: float | None) -> str:
    return "–" if x is None else f"{x * 1e6:.1f} µs"


def _plot_series(s: Series, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = [p.ratio for p in s.points]
    ax.plot(xs, [p.tuned_s * 1e6 for p in s.points], "o-", label="tuned for the share")
    pairs = [(p.ratio, p.whole_config_s * 1e6) for p in s.points if p.whole_config_s]
    if pairs:
        ax.plot(*zip(*pairs), "s--", label="100%-tuned config")
    pairs = [(p.ratio, p.baseline_s * 1e6) for p in s.points if p.baseline_s]
    if pairs:
        kind = next(p.baseline_kind for p in s.points if p.baseline_s)
        ax.plot(*zip(*pairs), "^:", label=f"vendor ({kind})")
    pairs = [(p.ratio, p.default_s * 1e6) for p in s.points if p.default_s]
    if pairs:
        ax.plot(*zip(*pairs), "x:", color="grey", label="TVM default")
    ax.set_xlabel("share of the device (%)")
    ax.set_ylabel("time (µs)")
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_title(f"{s.label} on {s.device_id}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_regret(d: ReportData, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.array([[np.nan if v is None else 100 * v for v in row] for row in d.regret], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 * len(d.regret_cols) + 4, 0.45 * len(d.regret_rows) + 1.5))
    im = ax.imshow(grid, cmap="Reds", aspect="auto", vmin=0, vmax=max(1.0, float(np.nanmax(grid))
                                                                      if np.isfinite(grid).any() else 1.0))
    ax.set_xticks(range(len(d.regret_cols)), [f"{c:g}%" for c in d.regret_cols])
    ax.set_yticks(range(len(d.regret_rows)), d.regret_rows, fontsize=7)
    for i, j in itertools.product(range(grid.shape[0]), range(grid.shape[1])):
        if np.isfinite(grid[i, j]):
            ax.text(j, i, f"{grid[i, j]:.1f}%", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="regret of the 100% config (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_interference(d: ReportData, path: Path) -> None:
    import matplotlib.pyplot as plt

    labels = [f"{e.label} {e.ratio:.4g}% {e.condition}" for e in d.interference]
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(labels) + 1.5))
    ax.barh(range(len(labels)), [e.slowdown for e in d.interference])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("best time under interference / best time alone")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _blocks(d: ReportData, plots: dict[str, Path]) -> list[tuple]:
    """The report as a list of blocks, rendered by both the Markdown and the HTML writers."""
    taken = f"; measurements taken {d.date_range[0]} to {d.date_range[1]}." if d.date_range else "."
    B: list[tuple] = [("h1", "spatialtune report"), ("p", f"Database {d.db_path}; generated {d.generated_at}{taken}")]
    B.append(("h2", SECTIONS[0]))
    B.append(("table", ["device id", "kind", "name", "units", "driver", "arch", "TVM", "registered"],
              [[x["id"], x["kind"], x["name"], f"{x['units']} {x['unit']}s", x.get("driver") or "",
                x.get("arch") or "", x.get("tvm_version") or "", _day(x["created_at"])] for x in d.devices]))
    B.append(("h2", SECTIONS[1]))
    B.append(("p", "Per workload: the config tuned for each share, the 100%-tuned config measured at that share, "
                   "and the vendor baseline measured under the same cap where one exists."))
    for i, s in enumerate(d.series):
        B.append(("h3", f"{s.label} — {s.workload_key} on {s.device_id} ({s.partition})"))
        if f"series{i}" in plots:
            B.append(("img", plots[f"series{i}"], f"time vs share for {s.label} ({s.partition})"))
        B.append(("table", ["share", "granted", "ratio-tuned", "100%-tuned", "vendor", "TVM default", "trials",
                            "measured"],
                  [[f"{p.ratio:.4g}%", "" if p.units is None else str(p.units), _us(p.tuned_s), _us(p.whole_config_s),
                    f"{_us(p.baseline_s)} ({p.baseline_kind})" if p.baseline_s else "–", _us(p.default_s),
                    str(p.n_trials), p.tuned_date] for p in s.points]))
    B.append(("h2", SECTIONS[2]))
    rows = [[s.label, s.device_id, f"{p.ratio:.4g}%", _us(p.tuned_s), _us(p.whole_config_s), f"{p.speedup:.3f}x",
             p.tuned_date] for s in d.series for p in s.points if p.speedup]
    if rows:
        B.append(("table", ["workload", "device", "share", "ratio-tuned", "100%-tuned", "speedup", "measured"], rows))
        B.append(("table", ["share", "geometric mean speedup", "series"],
                  [[f"{r:g}%", f"{g:.3f}x", str(sum(1 for s in d.series for p in s.points
                                                      if p.ratio == r and p.speedup))]
                   for r, g in d.geomean_speedup.items()]))
    else:
        B.append(("p", "No share has both its own best config and the 100%-tuned config measured."))
    B.append(("h2", SECTIONS[3]))
    if "regret" in plots:
        B.append(("img", plots["regret"], "regret heat map"))
        B.append(("p", "Regret: how much slower the 100%-tuned config is than the ratio-tuned one at each share "
                       "(empty: not measured)."))
    else:
        B.append(("p", "No regret to show: no share has the 100%-tuned config measured."))
    B.append(("h2", SECTIONS[4]))
    if d.correlations:
        B.append(("table", ["workload", "device", "shares", "common candidates", "Spearman rho", "same best"],
                  [[c.label, c.device_id, f"{c.ratio_a:g}% vs {c.ratio_b:g}%", str(c.n_common),
                    "–" if c.rho is None else f"{c.rho:.3f}", "yes" if c.same_best else "no"]
                   for c in d.correlations]))
        B.append(("p", f"rho needs at least {MIN_COMMON} candidates measured at both shares."))
    else:
        B.append(("p", "No workload was measured at two shares."))
    B.append(("h2", SECTIONS[5]))
    if d.interference:
        if "interference" in plots:
            B.append(("img", plots["interference"], "interference slowdown"))
        B.append(("table", ["workload", "device", "share", "condition", "best alone", "best under it", "slowdown",
                            "neighbour throughput", "same config", "measured"],
                  [[e.label, e.device_id, f"{e.ratio:.4g}%", e.condition, _us(e.quiet_s), _us(e.best_s),
                    f"{e.slowdown:.2f}x",
                    "–" if e.neighbour_throughput is None else f"{e.neighbour_throughput:.3g} {e.neighbour_unit}",
                    "yes" if e.same_config else "no", e.date] for e in d.interference]))
    else:
        conds = sorted({s.interference for s in d.series})
        B.append(("p", f"No condition other than 'none' was tuned next to a quiet run (conditions: "
                       f"{', '.join(conds) or 'none'})."))
    return B


def _markdown(blocks: list[tuple], out: Path) -> str:
    lines: list[str] = []
    for b in blocks:
        if b[0] in ("h1", "h2", "h3"):
            lines += ["#" * int(b[0][1]) + " " + b[1], ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "img":
            lines += [f"![{b[2]}]({b[1].relative_to(out).as_posix()})", ""]
        elif b[0] == "table":
            cell = lambda x: str(x).replace("|", "\\|")  # noqa: E731
            lines += ["| " + " | ".join(map(cell, b[1])) + " |", "|" + "---|" * len(b[1])]
            lines += ["| " + " | ".join(map(cell, r)) + " |" for r in b[2]] + [""]
    return "\n".join(lines)


def _html(blocks: list[tuple]) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>spatialtune report</title><style>"
             "body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.2em .6em;"
             "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%}"
             "</style></head><body>"]
    for b in blocks:
        if b[0] in ("h1", "h2", "h3"):
            parts.append(f"<{b[0]}>{e(b[1])}</{b[0]}>")
        elif b[0] == "p":
            parts.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "img":
            data = base64.b64encode(b[1].read_bytes()).decode()
            parts.append(f"<p><img alt='{e(b[2])}' src='data:image/png;base64,{data}'></p>")
        elif b[0] == "table":
            parts.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in b[1]) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b[2]]
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render(d: ReportData, out: Path) -> list[Path]:
    """Write report.md, report.html and the PNG plots of ``d`` under ``out``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    for i, s in enumerate(d.series):
        # One file per series: a workload tuned under two partitions has two plots of one label.
        p = out / "plots" / f"share_{i:02d}_{_slug(s.label)}_{s.partition}.png"
        _plot_series(s, p)
        plots[f"series{i}"] = p
    if any(v is not None for row in d.regret for v in row):
        plots["regret"] = out / "plots" / "regret.png"
        _plot_regret(d, plots["regret"])
    if d.interference:
        plots["interference"] = out / "plots" / "interference.png"
        _plot_interference(d, plots["interference"])
    blocks = _blocks(d, plots)
    md, page = out / "report.md", out / "report.html"
    md.write_text(_markdown(blocks, out))
    page.write_text(_html(blocks))
    return [md, page, *plots.values()]


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s)[:60]


def write_report(db: TuningDatabase, out: Path) -> list[Path]:
    """Compute and render the report of ``db`` into ``out``; returns the files written."""
    return render(compute_report(db), out)
