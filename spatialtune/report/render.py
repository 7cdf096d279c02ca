"""Rendering a :class:`~spatialtune.report.data.ReportData`: report.md, a self-contained
report.html (plots inlined as base64 PNG) and the PNG plots."""

from __future__ import annotations

import base64
import html
import itertools
from pathlib import Path

from .data import MIN_COMMON, SECTIONS, ReportData, Series, day


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

    grid = np.array([[np.nan if v is None else v for v in row] for row in d.regret], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 * len(d.regret_cols) + 4, 0.45 * len(d.regret_rows) + 1.5))
    im = ax.imshow(grid, cmap="Reds", aspect="auto", vmin=1.0, vmax=max(1.1, float(np.nanmax(grid))
                                                                        if np.isfinite(grid).any() else 1.1))
    ax.set_xticks(range(len(d.regret_cols)), [f"{c:g}%" for c in d.regret_cols])
    ax.set_yticks(range(len(d.regret_rows)), d.regret_rows, fontsize=7)
    for i, j in itertools.product(range(grid.shape[0]), range(grid.shape[1])):
        if np.isfinite(grid[i, j]):
            ax.text(j, i, f"{grid[i, j]:.2f}x", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="regret of the 100% config (time ratio)")
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
    B += _tenancy_blocks(d, plots)
    B.append(("h2", SECTIONS[1]))
    B.append(("table", ["device id", "kind", "name", "units", "driver", "arch", "TVM", "registered"],
              [[x["id"], x["kind"], x["name"], f"{x['units']} {x['unit']}s", x.get("driver") or "",
                x.get("arch") or "", x.get("tvm_version") or "", day(x["created_at"])] for x in d.devices]))
    B.append(("h2", SECTIONS[2]))
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
    B.append(("h2", SECTIONS[3]))
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
    B.append(("h2", SECTIONS[4]))
    if "regret" in plots:
        B.append(("img", plots["regret"], "regret heat map"))
        B.append(("p", "Regret: how much slower the 100%-tuned config is than the ratio-tuned one at each share "
                       "(empty: not measured)."))
    else:
        B.append(("p", "No regret to show: no share has the 100%-tuned config measured."))
    B.append(("h2", SECTIONS[5]))
    if d.correlations:
        B.append(("table", ["workload", "device", "shares", "common candidates", "Spearman rho", "same best"],
                  [[c.label, c.device_id, f"{c.ratio_a:g}% vs {c.ratio_b:g}%", str(c.n_common),
                    "–" if c.rho is None else f"{c.rho:.3f}", "yes" if c.same_best else "no"]
                   for c in d.correlations]))
        B.append(("p", f"rho needs at least {MIN_COMMON} candidates measured at both shares."))
    else:
        B.append(("p", "No workload was measured at two shares."))
    B.append(("h2", SECTIONS[6]))
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
    return B + _model_blocks(d)


def _model_blocks(d: ReportData) -> list[tuple]:
    B: list[tuple] = [("h2", SECTIONS[7])]
    if not d.models:
        B.append(("p", "No model was run end to end (spatialtune model MODEL.onnx --ratios ...)."))
        return B
    B.append(("p", "Whole-model latency under each share: compiled with the kernels tuned for that share, with those "
                   "tuned for 100 %, and untuned, next to ONNX Runtime confined to the same cores. vs ORT: "
                   "share-tuned latency / ONNX Runtime's (< 1: faster). Every variant's outputs are checked against "
                   "ONNX Runtime's."))
    groups: dict[tuple, dict[str, object]] = {}
    for m in d.models:
        groups.setdefault((m.model, m.device_id, m.partition, m.ratio), {})[m.variant] = m
    rows = []
    for (model, dev, part, ratio), v in sorted(groups.items(), key=lambda kv: (kv[0][:3], -kv[0][3])):
        st, ort = v.get("share-tuned"), v.get("onnxruntime")
        lat = lambda k: _us(v[k].latency_s) if k in v and v[k].latency_s else "–"  # noqa: E731
        vs = f"{st.latency_s / ort.latency_s:.2f}x" if st and ort and st.latency_s and ort.latency_s else "–"
        bad = [f"{k}: {m.status}" for k, m in v.items() if m.status != "ok"]
        tasks = [t for t in (st.detail.get("tasks", {}).values() if st else []) if t.get("time_s")]
        top = max(tasks, key=lambda t: t["weight"] * t["time_s"], default=None)
        rows.append([model, dev, part, f"{ratio:.4g}%", str(next(iter(v.values())).granted_units or ""),
                     lat("share-tuned"), lat("whole-tuned"), lat("untuned"), lat("onnxruntime"), vs,
                     f"{st.tuned_tasks}/{st.n_tasks}" if st else "–", str(st.trials) if st and st.trials else "–",
                     top["name"] if top else "–", "; ".join(bad) or "ok", day(next(iter(v.values())).created_at)])
    B.append(("table", ["model", "device", "partition", "share", "cores", "share-tuned", "100%-tuned", "untuned",
                        "ONNX Runtime", "vs ORT", "tasks tuned", "trials", "costliest task", "check", "run"], rows))
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


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}x"


def _tenancy_blocks(d: ReportData, plots: dict[str, Path]) -> list[tuple]:
    t = d.tenancy
    B: list[tuple] = [("h2", SECTIONS[0])]
    B.append(("p", "If the kernels an ordinary tuner gives (the best at 100 % of the device with no neighbour) are "
                   "deployed into a share next to a neighbour, how much slower are they than kernels tuned for that "
                   "share and neighbour? Regret = the ordinary config's time there / the tuned config's time there, "
                   "both measured there. Its factors: share alone (both without a neighbour) and neighbour alone "
                   "(the share's quiet config under the neighbour / the config tuned there). Baseline/tuned > 1: "
                   "the tuned kernel also beats the vendor library measured under the same share and neighbour."))
    if t is None or not t.cells:
        B.append(("p", "Nothing tuned yet."))
        return B
    if "tenancy" in plots:
        B.append(("img", plots["tenancy"], "deployment regret heat map"))
    B.append(("table", ["workload", "device", "partition", "share", "neighbour", "regret", "share alone",
                        "neighbour alone", "tuned here", "ordinary here", "baseline", "baseline/tuned"],
              [[c.name or c.workload_key, c.device_id, c.partition, f"{c.ratio:.4g}%", c.condition, _x(c.regret),
                _x(c.share_alone), _x(c.neighbour_alone), _us(c.best_s), _us(c.ordinary_s),
                f"{_us(c.baseline_s)} ({c.baseline_kind})" if c.baseline_s else "–", _x(c.vs_baseline)]
               for c in t.cells]))
    if t.geomean_by_share:
        B.append(("table", ["share", "geometric mean regret"], [[f"{r:.4g}%", _x(g)]
                                                                for r, g in t.geomean_by_share.items()]))
        B.append(("table", ["neighbour", "geometric mean regret"], [[c, _x(g)]
                                                                   for c, g in t.geomean_by_condition.items()]))
    missing = [f"{c.name or c.workload_key} {c.ratio:g}% {c.condition}: {'; '.join(c.missing)}"
               for c in t.cells if c.missing]
    if missing:
        B.append(("p", "Not measured yet (tuning the condition again or a bundle round measures them): "
                       + " | ".join(missing)))
    return B


def _plot_tenancy(d: ReportData, path: Path) -> bool:
    """One panel per (workload, device, partition): shares down, neighbours across."""
    import matplotlib.pyplot as plt
    import numpy as np

    groups: dict[tuple, list] = {}
    for c in d.tenancy.cells:
        groups.setdefault((c.name or c.workload_key, c.device_id, c.partition), []).append(c)
    groups = {k: v for k, v in groups.items() if any(c.regret for c in v)}
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    vmax = max(1.1, max(c.regret for cs in groups.values() for c in cs if c.regret))
    for ax, ((name, dev, part), cs) in zip(axes[0], groups.items()):
        shares = sorted({c.ratio for c in cs}, reverse=True)
        conds = sorted({c.condition for c in cs}, key=lambda x: (x != "none", x))
        grid = np.full((len(shares), len(conds)), np.nan)
        for c in cs:
            if c.regret:
                grid[shares.index(c.ratio), conds.index(c.condition)] = c.regret
        im = ax.imshow(grid, cmap="Reds", vmin=1.0, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(conds)), conds, fontsize=7, rotation=20)
        ax.set_yticks(range(len(shares)), [f"{r:.4g}%" for r in shares], fontsize=7)
        for i, j in itertools.product(range(len(shares)), range(len(conds))):
            ax.text(j, i, "–" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}x", ha="center", va="center",
                    fontsize=7)
        ax.set_title(f"{name} ({part}, {dev})", fontsize=8)
        ax.set_xlabel("neighbour", fontsize=7)
        ax.set_ylabel("share", fontsize=7)
    fig.colorbar(im, ax=list(axes[0]), label="deployment regret (time ratio)")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def render(d: ReportData, out: Path) -> list[Path]:
    """Write report.md, report.html and the PNG plots of ``d`` under ``out``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    if d.tenancy is not None and _plot_tenancy(d, out / "plots" / "tenancy.png"):
        plots["tenancy"] = out / "plots" / "tenancy.png"
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
