"""Rendering a :class:`~spatialtune.report.data.ReportData`: report.md, a self-contained
report.html (plots inlined as base64 PNG) and the PNG plots."""

from __future__ import annotations

import base64
import html
import itertools
from pathlib import Path

from .cells import Cell, device_cell
from .cells import us as _us
from .data import MIN_COMMON, SECTIONS, ReportData, Series, day
from .lead import lead_blocks, plot_lead


def _plot_series(s: Series, device: str, path: Path) -> None:
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
    ax.set_title(f"{s.label} on {device}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_regret(d: ReportData, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.array([[np.nan if v is None else v for v in row] for row in d.regret], dtype=float)
    # 10 inches wide like the lead's heat maps: shown full width, its labels stay legible.
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(d.regret_rows) + 1.8))
    im = ax.imshow(grid, cmap="Reds", aspect="auto", vmin=1.0, vmax=max(1.1, float(np.nanmax(grid))
                                                                        if np.isfinite(grid).any() else 1.1))
    ax.set_xticks(range(len(d.regret_cols)), [f"{c:g}%" for c in d.regret_cols], fontsize=11)
    ax.set_yticks(range(len(d.regret_rows)), d.regret_rows, fontsize=11)
    top = im.get_clim()[1]
    for i, j in itertools.product(range(grid.shape[0]), range(grid.shape[1])):
        if np.isfinite(grid[i, j]):
            dark = grid[i, j] > 1.0 + 0.6 * (top - 1.0)  # white on the darkest reds, as in the lead's
            ax.text(j, i, f"{grid[i, j]:.2f}x", ha="center", va="center", fontsize=12,
                    color="white" if dark else "black")
    ax.set_xlabel("share of the device", fontsize=11)
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
    ax.set_yticks(range(len(labels)), labels, fontsize=9)
    ax.set_xlabel("best time under interference / best time alone")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _blocks(d: ReportData, plots: dict[str, Path]) -> list[tuple]:
    """The report as a list of blocks, rendered by both the Markdown and the HTML writers."""
    taken = f"; measurements taken {d.date_range[0]} to {d.date_range[1]}." if d.date_range else "."
    B: list[tuple] = [("h1", "spatialtune report"), ("p", f"Database {d.db_path}; generated {d.generated_at}{taken}")]
    B += lead_blocks(d, plots)
    return (B + _device_blocks(d) + _series_blocks(d, plots) + _speedup_blocks(d) + _regret_blocks(plots)
            + _correlation_blocks(d) + _interference_blocks(d, plots) + _model_blocks(d))


def _device_blocks(d: ReportData) -> list[tuple]:
    B: list[tuple] = [("h2", SECTIONS[1])]
    B.append(("p", "Elsewhere the report names each device as in the first column (in report.html its id shows on "
                   "hover)."))
    B.append(("table", ["device", "id", "driver", "arch", "TVM", "registered"],
              [[d.device_names.get(x["id"], x["id"]), x["id"], x.get("driver") or "",
                x.get("arch") or "", x.get("tvm_version") or "", day(x["created_at"])] for x in d.devices]))
    return B


def _series_blocks(d: ReportData, plots: dict[str, Path]) -> list[tuple]:
    B: list[tuple] = [("h2", SECTIONS[2])]
    B.append(("p", "Per workload: the config tuned for each share, the 100%-tuned config measured at that share, "
                   "and the vendor baseline measured under the same cap where one exists."))
    for i, s in enumerate(d.series):
        dev = device_cell(d.device_names, s.device_id)
        B.append(("h3", Cell(f"{s.label} on {dev.text} ({s.partition})", f"{s.workload_key} on {s.device_id}")))
        if f"series{i}" in plots:
            B.append(("img", plots[f"series{i}"], f"time vs share for {s.label} ({s.partition})"))
        B.append(("table", ["share", "granted", "ratio-tuned", "100%-tuned", "vendor", "TVM default", "trials",
                            "measured"],
                  [[f"{p.ratio:.4g}%", "" if p.units is None else str(p.units), _us(p.tuned_s), _us(p.whole_config_s),
                    f"{_us(p.baseline_s)} ({p.baseline_kind})" if p.baseline_s else "–", _us(p.default_s),
                    str(p.n_trials), p.tuned_date] for p in s.points]))
    return B


def _speedup_blocks(d: ReportData) -> list[tuple]:
    B: list[tuple] = [("h2", SECTIONS[3])]
    rows = [[s.label, device_cell(d.device_names, s.device_id), f"{p.ratio:.4g}%", _us(p.tuned_s),
             _us(p.whole_config_s), f"{p.speedup:.3f}x", p.tuned_date] for s in d.series for p in s.points if p.speedup]
    if rows:
        B.append(("table", ["workload", "device", "share", "ratio-tuned", "100%-tuned", "speedup", "measured"], rows))
        B.append(("table", ["share", "geometric mean speedup", "series"],
                  [[f"{r:g}%", f"{g:.3f}x", str(sum(1 for s in d.series for p in s.points
                                                      if p.ratio == r and p.speedup))]
                   for r, g in d.geomean_speedup.items()]))
    else:
        B.append(("p", "No share has both its own best config and the 100%-tuned config measured."))
    return B


def _regret_blocks(plots: dict[str, Path]) -> list[tuple]:
    B: list[tuple] = [("h2", SECTIONS[4])]
    if "regret" in plots:
        B.append(("img", plots["regret"], "regret heat map", "wide"))
        B.append(("p", "Regret: how much slower the 100%-tuned config is than the ratio-tuned one at each share "
                       "(empty: not measured)."))
    else:
        B.append(("p", "No regret to show: no share has the 100%-tuned config measured."))
    return B


def _correlation_blocks(d: ReportData) -> list[tuple]:
    B: list[tuple] = [("h2", SECTIONS[5])]
    if d.correlations:
        B.append(("table", ["workload", "device", "shares", "common candidates", "Spearman rho", "same best"],
                  [[c.label, device_cell(d.device_names, c.device_id), f"{c.ratio_a:g}% vs {c.ratio_b:g}%",
                    str(c.n_common), "–" if c.rho is None else f"{c.rho:.3f}", "yes" if c.same_best else "no"]
                   for c in d.correlations]))
        B.append(("p", f"rho needs at least {MIN_COMMON} candidates measured at both shares."))
    else:
        B.append(("p", "No workload was measured at two shares."))
    return B


def _interference_blocks(d: ReportData, plots: dict[str, Path]) -> list[tuple]:
    B: list[tuple] = [("h2", SECTIONS[6])]
    if d.interference:
        if "interference" in plots:
            B.append(("img", plots["interference"], "interference slowdown"))
        B.append(("table", ["workload", "device", "share", "condition", "best alone", "best under it", "slowdown",
                            "neighbour throughput", "same config", "measured"],
                  [[e.label, device_cell(d.device_names, e.device_id), f"{e.ratio:.4g}%", e.condition,
                    _us(e.quiet_s), _us(e.best_s), f"{e.slowdown:.2f}x",
                    "–" if e.neighbour_throughput is None else f"{e.neighbour_throughput:.3g} {e.neighbour_unit}",
                    "yes" if e.same_config else "no", e.date] for e in d.interference]))
    else:
        conds = sorted({s.interference for s in d.series})
        B.append(("p", f"No condition other than 'none' was tuned next to a quiet run (conditions: "
                       f"{', '.join(conds) or 'none'})."))
    return B


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
    for m in d.models:  # a bundle run also times each model next to a neighbour: another row
        groups.setdefault((m.model, m.device_id, m.partition, m.ratio, m.detail.get("interference", "none")),
                          {})[m.variant] = m
    # Two tables, latencies then how they were got: one of 15 columns does not fit a laptop's width.
    rows, how = [], []
    for (model, dev, part, ratio, near), v in sorted(groups.items(),
                                                     key=lambda kv: (kv[0][:3], -kv[0][3], kv[0][4])):
        st, ort = v.get("share-tuned"), v.get("onnxruntime")
        lat = lambda k: _us(v[k].vendor_s) if k in v and v[k].vendor_s else "–"  # noqa: E731
        vs = f"{st.latency_s / ort.vendor_s:.2f}x" if st and ort and st.latency_s and ort.vendor_s else "–"
        bad = [f"{k}: {m.status}" for k, m in v.items() if m.status != "ok"]
        tasks = [t for t in (st.detail.get("tasks", {}).values() if st else []) if t.get("time_s")]
        top = max(tasks, key=lambda t: t["weight"] * t["time_s"], default=None)
        share = f"{part} {ratio:.4g}%" + ("" if near == "none" else f" next to {near}")
        rows.append([model, device_cell(d.device_names, dev), share, str(next(iter(v.values())).granted_units or ""),
                     lat("share-tuned"), lat("whole-tuned"), lat("untuned"), lat("onnxruntime"), vs])
        how.append([model, share, f"{st.tuned_tasks}/{st.n_tasks}" if st else "–",
                    str(st.trials) if st and st.trials else "–", top["name"] if top else "–",
                    "; ".join(bad) or "ok", day(next(iter(v.values())).created_at)])
    B.append(("table", ["model", "device", "share", "cores", "share-tuned", "100%-tuned", "untuned", "ONNX Runtime",
                        "vs ORT"], rows))
    B.append(("table", ["model", "share", "tasks tuned", "trials", "costliest task", "check", "run"], how))
    return B


def _markdown(blocks: list[tuple], out: Path) -> str:
    lines: list[str] = []
    for b in blocks:
        if b[0] in ("h1", "h2", "h3"):
            lines += ["#" * int(b[0][1]) + " " + str(b[1]), ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "img":
            lines += [f"![{b[2]}]({b[1].relative_to(out).as_posix()})", ""]
        elif b[0] == "table":
            cell = lambda x: str(x).replace("|", "\\|")  # noqa: E731
            lines += ["| " + " | ".join(map(cell, b[1])) + " |", "|" + "---|" * len(b[1])]
            lines += ["| " + " | ".join(map(cell, r)) + " |" for r in b[2]] + [""]
    return "\n".join(lines)


# The page fits the window: it uses the width a laptop gives (tables have many columns) but keeps
# paragraphs to a readable measure; a table cell wraps between words (a header may hyphenate),
# and long words (paths, ids) may break anywhere outside tables; an image never outgrows its
# column, and a "wide" one (a heat map, drawn 10 inches wide) fills it up to the paragraphs' measure.
STYLE = ("body{font-family:sans-serif;max-width:88em;margin:2em auto;padding:0 1em;overflow-wrap:anywhere}"
         "p{max-width:60em}table{border-collapse:collapse;margin:.5em 0 1.5em;max-width:100%}"
         "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right;overflow-wrap:break-word}"
         "th{background:#f3f3f3;hyphens:auto}td:first-child{text-align:left}"
         "img{max-width:100%;height:auto}img.wide{width:100%;max-width:60em}"
         "td.vendor{background:#ffdcb8}td.unchecked{background:#e8ddff}h3[title]{text-decoration:underline dotted}")


def _attrs(x) -> str:
    e = html.escape
    if not isinstance(x, Cell):
        return ""
    return (f" title='{e(x.title)}'" if x.title else "") + (f" class='{e(x.mark)}'" if x.mark else "")


def _html(blocks: list[tuple]) -> str:
    e = html.escape
    td = lambda c: e(str(c)).replace(" µs", "\u00a0µs")  # noqa: E731  (a time never splits from its unit)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>spatialtune report</title>"
             f"<meta name='viewport' content='width=device-width'><style>{STYLE}</style></head><body>"]
    for b in blocks:
        if b[0] in ("h1", "h2", "h3"):
            parts.append(f"<{b[0]}{_attrs(b[1])}>{e(str(b[1]))}</{b[0]}>")
        elif b[0] == "p":
            parts.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "img":
            data = base64.b64encode(b[1].read_bytes()).decode()
            cls = f" class='{b[3]}'" if len(b) > 3 else ""
            parts.append(f"<p><img{cls} alt='{e(b[2])}' src='data:image/png;base64,{data}'></p>")
        elif b[0] == "table":
            parts.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in b[1]) + "</tr>")
            parts += ["<tr>" + "".join(f"<td{_attrs(c)}>{td(c)}</td>" for c in r) + "</tr>" for r in b[2]]
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
    plots.update(plot_lead(d, out / "plots"))
    for i, s in enumerate(d.series):
        # One file per series: a workload tuned under two partitions has two plots of one label.
        p = out / "plots" / f"share_{i:02d}_{_slug(s.label)}_{s.partition}.png"
        _plot_series(s, d.device_names.get(s.device_id, s.device_id), p)
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
