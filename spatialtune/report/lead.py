"""The report's lead, *what single-tenant tuning costs*: one workload on one device at a time, each
with its own full-width heat map and a table of its cells. One heat map per workload keeps its
labels legible at a laptop's width (side-by-side panels shrink to thumbnails), and the table
needs no workload or device column, so it fits the page without scrolling sideways."""

from __future__ import annotations

import itertools
from pathlib import Path

from .cells import Cell, device_cell, times, us
from .data import SECTIONS, ReportData
from .tenancy import DeploymentCell, WorkloadSummary

INTRO = ("If the kernels an ordinary tuner gives (the best at 100 % of the device with no neighbour) are deployed "
         "into a share next to a neighbour, how much slower are they than kernels tuned for that share and "
         "neighbour? Regret = the ordinary config's time there / the tuned config's time there, both measured "
         "there. Its factors: share alone (both without a neighbour) and neighbour alone (the share's quiet config "
         "under the neighbour / the config tuned there). Winner from: where the tuned kernel was first measured "
         "(its own search, or another share's or neighbour's, then measured here). Vendor / tuned > 1: the tuned "
         "kernel beats the vendor library measured under the same share and neighbour; < 1 is marked 'vendor "
         "faster'. Unchecked rows (imported kernels whose outputs were never checked) are counted, never used.")

HEADER = ["share (units)", "neighbour", "regret", "share alone", "neighbour alone", "tuned here", "winner from",
          "ordinary here", "vendor", "vendor / tuned", "notes"]


def lead_groups(d: ReportData) -> list[tuple[WorkloadSummary, list[DeploymentCell]]]:
    """Each workload on each device with its cells, in the tenancy's order."""
    by: dict[tuple[str, str], list[DeploymentCell]] = {}
    for c in d.tenancy.cells if d.tenancy else []:
        by.setdefault((c.workload_key, c.device_id), []).append(c)
    return [(w, by.get((w.workload_key, w.device_id), [])) for w in (d.tenancy.workloads if d.tenancy else [])]


def summary(w: WorkloadSummary) -> str:
    out = f"{w.cells} cells (share x neighbour); the vendor library is faster than the tuned best in " + (
        f"{w.vendor_faster} (marked 'vendor faster')." if w.vendor_faster else "none.")
    if w.unchecked:
        out += (f" {w.unchecked} unchecked rows (outputs never checked against the reference), {w.unchecked_faster} "
                "of them faster than the checked best of their key: none is used as a best.")
    else:
        out += " No unchecked rows."
    if w.unchecked_only:
        out += f" Only unchecked rows, so no cell: {', '.join(w.unchecked_only)}."
    return out


def _row(c: DeploymentCell, partitions: int) -> list:
    share = f"{c.ratio:.4g}%" + (f" ({c.units})" if c.units else "")
    notes = []
    if c.vendor_faster:
        notes.append("vendor faster")
    if c.unchecked:
        notes.append(f"{c.unchecked} unchecked" + (f", {c.unchecked_faster} faster (not used)"
                                                   if c.unchecked_faster else ""))
    notes += [f"missing: {m}" for m in c.missing]
    mark = "vendor" if c.vendor_faster else ""
    return [f"{c.partition} {share}" if partitions > 1 else share, c.condition, times(c.regret),
            times(c.share_alone), times(c.neighbour_alone), us(c.best_s), c.origin or "–", us(c.ordinary_s),
            f"{us(c.baseline_s)} {c.baseline_kind}" if c.baseline_s else "–", Cell(times(c.vs_baseline), mark=mark),
            Cell("; ".join(notes), mark=mark or ("unchecked" if c.unchecked_faster else ""))]


def lead_blocks(d: ReportData, plots: dict[str, Path]) -> list[tuple]:
    t = d.tenancy
    B: list[tuple] = [("h2", SECTIONS[0]), ("p", INTRO)]
    if t is None or not t.cells:
        B.append(("p", "Nothing tuned yet."))
        return B
    for i, (w, cells) in enumerate(lead_groups(d)):
        dev = device_cell(d.device_names, w.device_id)
        name = w.name or w.workload_key
        B.append(("h3", Cell(f"{name} on {dev.text}", dev.title)))
        B.append(("p", summary(w)))
        if f"lead{i}" in plots:
            B.append(("img", plots[f"lead{i}"], f"deployment regret of {name} on {dev.text}", "wide"))
        parts = len({c.partition for c in cells})
        B.append(("table", HEADER, [_row(c, parts) for c in cells]))
    if t.geomean_by_share:
        B.append(("h3", "Over every workload"))
        B.append(("table", ["share", "geometric mean regret"], [[f"{r:.4g}%", times(g)]
                                                                for r, g in t.geomean_by_share.items()]))
        B.append(("table", ["neighbour", "geometric mean regret"], [[c, times(g)]
                                                                   for c, g in t.geomean_by_condition.items()]))
    if any(c.missing for c in t.cells):
        B.append(("p", "Cells with something missing: tuning the condition again or a bundle round measures it."))
    return B


def plot_lead(d: ReportData, out: Path) -> dict[str, Path]:
    """One heat map per workload and device with a regret (shares down, neighbours across), on one
    colour scale for all, drawn 10 inches wide so its labels stay legible at the page's width."""
    import matplotlib.pyplot as plt
    import numpy as np

    groups = lead_groups(d)
    regrets = [c.regret for _, cs in groups for c in cs if c.regret]
    if not regrets:
        return {}
    vmax = max(1.1, max(regrets))
    plots: dict[str, Path] = {}
    for i, (w, cs) in enumerate(groups):
        if not any(c.regret for c in cs):
            continue
        parts = len({c.partition for c in cs})
        rows = sorted({(c.partition, c.ratio) for c in cs}, key=lambda k: (k[0], -k[1]))
        conds = sorted({c.condition for c in cs}, key=lambda x: (x != "none", x))
        grid = np.full((len(rows), len(conds)), np.nan)
        text = [["–"] * len(conds) for _ in rows]
        for c in cs:
            r, k = rows.index((c.partition, c.ratio)), conds.index(c.condition)
            if c.regret:
                grid[r, k] = c.regret
                text[r][k] = f"{c.regret:.2f}x"
            if c.vendor_faster:
                text[r][k] += "\nvendor faster"
        fig, ax = plt.subplots(figsize=(10, 1.1 * len(rows) + 1.9))
        im = ax.imshow(grid, cmap="Reds", vmin=1.0, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(conds)), conds, fontsize=12)
        ax.set_yticks(range(len(rows)), [(f"{p} " if parts > 1 else "") + f"{r:.4g}%" for p, r in rows], fontsize=12)
        for r, k in itertools.product(range(len(rows)), range(len(conds))):
            dark = np.isfinite(grid[r, k]) and grid[r, k] > 1.0 + 0.6 * (vmax - 1.0)
            ax.text(k, r, text[r][k], ha="center", va="center", fontsize=13, color="white" if dark else "black")
        ax.set_xlabel("neighbour", fontsize=12)
        ax.set_ylabel("share of the device", fontsize=12)
        ax.set_title(f"{w.name or w.workload_key} on {d.device_names.get(w.device_id, w.device_id)}", fontsize=13)
        bar = fig.colorbar(im, ax=ax)
        bar.set_label("deployment regret (time ratio)", fontsize=11)
        bar.ax.tick_params(labelsize=10)
        fig.tight_layout()
        plots[f"lead{i}"] = out / f"regret_{i:02d}_{''.join(ch if ch.isalnum() else '_' for ch in w.name)[:40]}.png"
        fig.savefig(plots[f"lead{i}"], dpi=100)
        plt.close(fig)
    return plots
