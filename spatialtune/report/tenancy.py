"""What single-tenant tuning costs: the deployment regret, computed from measured rows only.

For a workload at share r next to neighbour c (one device, one partition):

- the *ordinary config* is the one an ordinary tuner gives: the best at 100 % with no neighbour;
- **deployment regret** = time of the ordinary config measured at (r, c) / time of the best
  config tuned for (r, c) (:func:`spatialtune.terms.regret`: >= 1, the ordinary config is slower);
- its two factors: **share alone** = ordinary config at (r, none) / best at (r, none), both quiet;
  **neighbour alone** = the best quiet config of share r, measured at (r, c) / best at (r, c),
  both under the neighbour;
- the **baseline** (numpy on CPUs, cuBLAS on GPUs) measured under the same (r, c), and
  ``baseline / tuned`` (> 1: the tuned kernel is faster than the library there); a cell where it
  is < 1 is a *vendor cell*: the library beats every kernel tuned there;
- the **origin** of the tuned best: the key under which that kernel was first measured
  (:func:`spatialtune.search.policy.winner_origins`: its own search, another share's, another
  neighbour's);
- **unchecked** rows: measurements whose outputs were never checked against the reference (status
  ``unchecked``, MetaSchedule records imported as they are). They are counted, and those faster
  than the checked best of their key are counted apart, but they are never a best: a wrong kernel
  is fast for free.

Every number is a stored measurement; a cell whose configs were not measured under its condition
is reported as missing with what is missing (``tune`` and bundle rounds measure them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..terms import WHOLE, Condition, geomean, norm_ratio, regret

BASELINES = {"cpu": ("numpy",), "cuda": ("cublas", "torch")}  # preferred first
UNCHECKED = "unchecked"


@dataclass
class DeploymentCell:
    workload_key: str
    name: str
    device_id: str
    partition: str
    ratio: float
    condition: str  # the neighbour
    units: int | None
    best_s: float
    best_hash: str
    ordinary_hash: str | None
    ordinary_s: float | None  # the ordinary config measured here
    quiet_hash: str | None  # best at this share without a neighbour
    quiet_s_here: float | None  # ... measured here (under the neighbour)
    quiet_s: float | None  # best at this share, no neighbour
    ordinary_quiet_s: float | None  # the ordinary config at this share, no neighbour
    baseline_kind: str | None
    baseline_s: float | None
    missing: list[str] = field(default_factory=list)
    origin: str | None = None  # where the tuned best was first measured (Origin.label())
    unchecked: int = 0  # unchecked rows under this key
    unchecked_faster: int = 0  # ... of them faster than best_s (not used: their outputs were never checked)

    @property
    def regret(self) -> float | None:
        return regret(self.ordinary_s, self.best_s)

    @property
    def share_alone(self) -> float | None:
        return regret(self.ordinary_quiet_s, self.quiet_s)

    @property
    def neighbour_alone(self) -> float | None:
        return None if self.condition == "none" else regret(self.quiet_s_here, self.best_s)

    @property
    def vs_baseline(self) -> float | None:
        """baseline time / tuned time: > 1 when the tuned kernel beats the library here."""
        return regret(self.baseline_s, self.best_s)

    @property
    def vendor_faster(self) -> bool:
        """The vendor library, measured under this cell's key, beats the best tuned kernel."""
        return self.baseline_s is not None and self.baseline_s < self.best_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"regret": self.regret, "share_alone": self.share_alone,
                               "neighbour_alone": self.neighbour_alone, "vs_baseline": self.vs_baseline,
                               "vendor_faster": self.vendor_faster}


@dataclass
class WorkloadSummary:
    """One workload on one device (all partitions): what the reader must know before trusting its cells."""

    workload_key: str
    name: str
    device_id: str
    cells: int
    vendor_faster: int  # cells where the vendor baseline beats the tuned best
    unchecked: int  # unchecked rows, every key
    unchecked_faster: int  # ... faster than the checked best of their key, or under a key with none
    unchecked_only: list[str] = field(default_factory=list)  # keys with unchecked rows and no checked best


@dataclass
class Tenancy:
    cells: list[DeploymentCell]
    geomean_by_share: dict[float, float]
    geomean_by_condition: dict[str, float]
    workloads: list[WorkloadSummary] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"cells": [c.to_dict() for c in self.cells], "workloads": [asdict(w) for w in self.workloads],
                "geomean_by_share": {f"{k:g}": v for k, v in self.geomean_by_share.items()},
                "geomean_by_condition": self.geomean_by_condition}


def deployment_cells(db, workload_key: str | None = None) -> Tenancy:
    """Every (workload, device, partition, share, neighbour) with a tuned best, as a cell."""
    from ..search.policy import winner_origins

    names = db.workload_names()
    kinds = {d["id"]: d["kind"] for d in db.devices()}
    best = {}
    for b in db.best(workload_key=workload_key):
        best[(b.workload_key, b.device_id, b.partition, norm_ratio(b.ratio), b.interference)] = b
    cells: list[DeploymentCell] = []
    workloads: list[WorkloadSummary] = []
    for wk, dev in sorted({k[:2] for k in best}):
        rows = db.measurements(workload_key=wk, device_id=dev)
        origins = winner_origins(rows)
        unchecked: dict[tuple, list[float | None]] = {}
        for m in rows:
            if m.status == UNCHECKED:
                unchecked.setdefault((m.partition, norm_ratio(m.ratio), m.interference), []).append(m.median_s)
        new = []
        for part in sorted({k[2] for k in best if k[:2] == (wk, dev)}):
            new += _partition_cells(db, best, names.get(wk, ""), kinds.get(dev, ""), wk, dev, part,
                                    [m for m in rows if m.partition == part and m.status == "ok"])
        for c in new:
            o = origins.get(Condition(c.partition, c.ratio, c.condition))
            c.origin = o.label() if o else None
            times = unchecked.get((c.partition, c.ratio, c.condition), [])
            c.unchecked = len(times)
            c.unchecked_faster = sum(1 for t in times if t is not None and t < c.best_s)
        cell_keys = {(c.partition, c.ratio, c.condition) for c in new}
        only = sorted(k for k in unchecked if k not in cell_keys)
        workloads.append(WorkloadSummary(
            wk, names.get(wk, ""), dev, len(new), sum(c.vendor_faster for c in new), sum(map(len, unchecked.values())),
            sum(c.unchecked_faster for c in new) + sum(len(unchecked[k]) for k in only),
            [f"{p} {r:g}% {i}" for p, r, i in only]))
        cells += new
    by_share: dict[float, list[float]] = {}
    by_cond: dict[str, list[float]] = {}
    for c in cells:
        if c.regret:
            by_share.setdefault(c.ratio, []).append(c.regret)
            by_cond.setdefault(c.condition, []).append(c.regret)
    return Tenancy(cells, {r: geomean(v) for r, v in sorted(by_share.items(), reverse=True)},
                   {k: geomean(v) for k, v in sorted(by_cond.items())}, workloads)


def _partition_cells(db, best: dict, name: str, kind: str, wk: str, dev: str, part: str,
                     ok_rows: list) -> list[DeploymentCell]:
    times: dict[tuple[float, str], dict[str, float]] = {}
    for m in ok_rows:
        times.setdefault((norm_ratio(m.ratio), m.interference), {})[m.mod_hash] = m.median_s
    base: dict[tuple[float, str], dict] = {}
    prefer = BASELINES.get(kind, ())
    for row in db.baselines(workload_key=wk, device_id=dev, partition=part):
        k = (norm_ratio(row["ratio"]), row["interference"])
        if row["kind"] in prefer and (k not in base or prefer.index(row["kind"]) < prefer.index(base[k]["kind"])):
            base[k] = row
    ordinary = best.get((wk, dev, part, WHOLE, "none"))
    keys = sorted((k[3], k[4]) for k in best if k[:3] == (wk, dev, part))
    cells = []
    for r, cond in sorted(keys, key=lambda k: (-k[0], k[1] != "none", k[1])):
        b = best[(wk, dev, part, r, cond)]
        quiet = best.get((wk, dev, part, r, "none"))
        here = times.get((r, cond), {})
        quiet_times = times.get((r, "none"), {})
        missing = []
        if ordinary is None:
            missing.append("no config tuned at 100 % without a neighbour")
        elif ordinary.mod_hash not in here:
            missing.append(f"ordinary config {ordinary.mod_hash} not measured here")
        if cond != "none":
            if quiet is None:
                missing.append(f"nothing tuned at {r:g}% without a neighbour")
            elif quiet.mod_hash not in here:
                missing.append(f"quiet config {quiet.mod_hash} of {r:g}% not measured here")
        bl = base.get((r, cond))
        cells.append(DeploymentCell(
            wk, name, dev, part, r, cond, b.granted_units, b.median_s, b.mod_hash,
            ordinary.mod_hash if ordinary else None, here.get(ordinary.mod_hash) if ordinary else None,
            quiet.mod_hash if quiet else None, here.get(quiet.mod_hash) if quiet else None,
            quiet.median_s if quiet else None,
            quiet_times.get(ordinary.mod_hash) if ordinary and quiet else None,
            bl["kind"] if bl else None, bl["median_s"] if bl else None, missing))
    return cells


def format_cells(t: Tenancy) -> str:
    """The terminal table ``spatialtune compare`` prints."""
    def x(v):
        return "-" if v is None else f"{v:.2f}x"

    def us(v):
        return "-" if v is None else (f"{v * 1e6:.1f} us" if v < 1e-3 else f"{v * 1e3:.3f} ms")

    hdr = ["workload", "partition", "share", "neighbour", "tuned here", "winner from", "ordinary here", "regret",
           "share alone", "neighbour alone", "baseline", "baseline/tuned"]
    rows = [[c.name or c.workload_key, c.partition, f"{c.ratio:g}%" + (f" ({c.units})" if c.units else ""),
             c.condition, us(c.best_s), c.origin or "-", us(c.ordinary_s), x(c.regret), x(c.share_alone),
             x(c.neighbour_alone), f"{us(c.baseline_s)} {c.baseline_kind}" if c.baseline_s else "-",
             x(c.vs_baseline) + (" vendor faster" if c.vendor_faster else "")] for c in t.cells]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(hdr)]
    out = ["  ".join(h.ljust(w) for h, w in zip(hdr, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    missing = [f"  {c.name or c.workload_key} {c.ratio:g}% {c.condition}: {'; '.join(c.missing)}"
               for c in t.cells if c.missing]
    if missing:
        out += ["missing (tune the condition again, or run a bundle round, to measure them):"] + missing
    vendor = sum(c.vendor_faster for c in t.cells)
    out.append(f"vendor library faster than the best tuned kernel in {vendor} of {len(t.cells)} cells")
    out.append("regret: the ordinary config (best at 100 % without a neighbour) at this share and neighbour / the "
               "config tuned here; share alone: the same, both without a neighbour; neighbour alone: this share's "
               "quiet config under the neighbour / the config tuned here; baseline/tuned > 1: tuned beats the library")
    return "\n".join(out)
