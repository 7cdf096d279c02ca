"""Reports: what tuning for a share buys, computed from the database, then rendered.

:func:`compute_report` reads a :class:`~spatialtune.database.TuningDatabase` into plain
dataclasses (:class:`ReportData`); :func:`render` turns those into ``report.md``, a self-contained
``report.html`` (plots inlined as base64 PNG) and the PNG files. Tests check the data without
plotting. Every number comes from the database and carries the device it was measured on and the
date of the measurement.

Definitions, per series (one workload on one device, partition and interference condition):

- *ratio-tuned*: the best config measured at share r (``best``);
- *100 %-tuned*: the config that is best at 100 %, as measured at share r (same ``mod_hash``);
- *regret* at r: 100 %-tuned time / ratio-tuned time (:func:`spatialtune.terms.regret`; > 1:
  tuning for the share paid off, the whole-device config is that much slower);
- *rank correlation* between shares a and b: Spearman's rho of the times of the candidates
  measured at both (same ``mod_hash``), when at least 3 are;
- *interference effect* at r: best time under the condition / best time with no neighbour;
- *models end to end*: a whole model's latency at each share (``spatialtune model``) compiled with
  the configs tuned for the share, with those tuned for 100 %, untuned, and ONNX Runtime's on
  the same cores; the latest run of each model and share.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..store.database import TuningDatabase
from ..store.model_runs import ModelRun, model_runs
from ..terms import norm_ratio, regret
from .tenancy import Tenancy, deployment_cells

log = logging.getLogger(__name__)

VENDOR_BASELINES = {"cpu": ("numpy",), "cuda": ("cublas", "torch")}
MIN_COMMON = 3
SECTIONS = ("What single-tenant tuning costs", "Devices", "Time vs share", "Speedup of ratio-tuned over 100%-tuned",
            "Regret heat map", "Rank correlation between shares", "Interference", "Models end to end")


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
        """The regret of the 100%-tuned config here (a time ratio, >= 1 when tuned here is faster)."""
        return regret(self.whole_config_s, self.tuned_s)


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
    regret: list[list[float | None]]  # rows x cols, time ratio (1.1 = the 100% config is 10 % slower)
    correlations: list[Correlation]
    interference: list[InterferenceEffect]
    tenancy: Tenancy | None = None
    models: list[ModelRun] = field(default_factory=list)  # the latest `spatialtune model` run per model and share
    device_names: dict[str, str] = field(default_factory=dict)  # id -> what a reader knows it by


def device_names(devices: list[dict[str, Any]]) -> dict[str, str]:
    """Each device as its name, kind and units (an id like ``cpu-8725174c4925`` says nothing to a
    reader); two devices of one description keep their ids apart."""
    label = {d["id"]: f"{d['name']} ({d['kind']}, {d['units']} {d['unit']}s)" for d in devices}
    seen: dict[str, int] = {}
    for v in label.values():
        seen[v] = seen.get(v, 0) + 1
    return {k: v if seen[v] == 1 else f"{v} {k}" for k, v in label.items()}


# ---------------------------------------------------------------- compute


def day(ts: str | None) -> str:
    return (ts or "")[:10]


def compute_report(db: TuningDatabase) -> ReportData:
    """Read everything the report shows from ``db``. Pure data; no plotting."""
    names = db.workload_names()
    devices = db.devices()
    dev_name = device_names(devices)
    dev_kind = {d["id"]: d["kind"] for d in devices}
    groups: dict[tuple, list] = {}
    for b in db.best():
        groups.setdefault((b.workload_key, b.device_id, b.partition, b.interference), []).append(b)
    series: list[Series] = []
    correlations: list[Correlation] = []
    ok_by_group: dict[tuple, dict[float, dict[str, Any]]] = {}
    for gk in sorted(groups):
        wkey, dev, part, interf = gk
        by_ratio: dict[float, dict[str, Any]] = {}
        for m in db.measurements(workload_key=wkey, device_id=dev, partition=part, interference=interf, status="ok"):
            by_ratio.setdefault(norm_ratio(m.ratio), {})[m.mod_hash] = m
        ok_by_group[gk] = by_ratio
        bests = {norm_ratio(b.ratio): b for b in groups[gk]}
        s = Series(wkey, names.get(wkey, ""), dev, part, interf)
        s.points = _share_points(db, s, bests, by_ratio, VENDOR_BASELINES.get(dev_kind.get(dev, ""), ()))
        series.append(s)
        correlations += _correlations(s, bests, by_ratio)
    dates = [d for s in series for p in s.points for d in (p.tuned_date, p.whole_config_date, p.baseline_date) if d]
    rows, cols, grid = _regret_grid(series, dev_name)
    return ReportData(str(db.path), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), devices,
                      (min(dates), max(dates)) if dates else None, series, _geomean_speedups(series), rows, cols,
                      grid, correlations, _interference_effects(series, ok_by_group), deployment_cells(db),
                      model_runs(db, latest=True), dev_name)


def _share_points(db: TuningDatabase, s: Series, bests: dict, by_ratio: dict[float, dict[str, Any]],
                  vendors: tuple[str, ...]) -> list[SharePoint]:
    """One point per share the series has a best at: the best, the 100 %-tuned config measured at
    that share, the vendor library (the first of ``vendors`` measured there) and TVM's default."""
    whole = bests.get(100.0)
    base = {}
    for row in db.baselines(workload_key=s.workload_key, device_id=s.device_id, partition=s.partition,
                            interference=s.interference):
        base[(norm_ratio(row["ratio"]), row["kind"])] = row
    points = []
    for r in sorted(bests):
        b = bests[r]
        tm = by_ratio.get(r, {}).get(b.mod_hash)
        wm = by_ratio.get(r, {}).get(whole.mod_hash) if whole else None
        vendor = next((base[(r, k)] for k in vendors if (r, k) in base), None)
        default = base.get((r, "tvm-default"))
        points.append(SharePoint(r, b.granted_units, b.median_s, b.mod_hash, day(tm.created_at if tm else b.updated_at),
                                 b.n_trials, wm.median_s if wm else None, day(wm.created_at) if wm else None,
                                 vendor["kind"] if vendor else None, vendor["median_s"] if vendor else None,
                                 day(vendor["created_at"]) if vendor else None,
                                 default["median_s"] if default else None))
    return points


def _correlations(s: Series, bests: dict, by_ratio: dict[float, dict[str, Any]]) -> list[Correlation]:
    """The rank correlation between every two shares of the series, over the candidates measured at both."""
    from scipy.stats import spearmanr

    out = []
    for ra, rb in itertools.combinations(sorted(by_ratio), 2):
        common = sorted(set(by_ratio[ra]) & set(by_ratio[rb]))
        rho = None
        if len(common) >= MIN_COMMON:
            v = spearmanr([by_ratio[ra][h].median_s for h in common], [by_ratio[rb][h].median_s for h in common])
            rho = None if math.isnan(v.statistic) else float(v.statistic)
        same = ra in bests and rb in bests and bests[ra].mod_hash == bests[rb].mod_hash
        out.append(Correlation(s.label, s.device_id, ra, rb, len(common), rho, same))
    return out


def _geomean_speedups(series: list[Series]) -> dict[float, float]:
    """Per share, the geometric mean of the regret over the series that have both configs there."""
    logs: dict[float, list[float]] = {}
    for s in series:
        for p in s.points:
            if p.speedup:
                logs.setdefault(p.ratio, []).append(math.log(p.speedup))
    return {r: math.exp(sum(v) / len(v)) for r, v in sorted(logs.items())}


def _regret_grid(series: list[Series], dev_name: dict[str, str]) -> tuple[list[str], list[float], list[list]]:
    """The regret matrix: a row per series (named with its device), a column per share."""
    cols = sorted({p.ratio for s in series for p in s.points})
    rows = [f"{s.label} ({dev_name.get(s.device_id, s.device_id)})" for s in series]
    grid = [[next((p.speedup for p in s.points if p.ratio == c and p.speedup), None) for c in cols]
            for s in series]
    return rows, cols, grid


def _interference_effects(series: list[Series], ok_by_group: dict[tuple, dict]) -> list[InterferenceEffect]:
    """Each series under a neighbour next to its quiet twin, share by share where both have a best."""
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
    return effects


def report_json(d: ReportData) -> dict[str, Any]:
    """The report's numbers for other tools (``spatialtune report --json``)."""
    out = asdict(replace(d, tenancy=None))
    out["tenancy"] = d.tenancy.to_dict() if d.tenancy else None
    out["geomean_speedup"] = {f"{k:g}": v for k, v in d.geomean_speedup.items()}
    for s, series in zip(out["series"], d.series):
        for p, point in zip(s["points"], series.points):
            p["regret"] = point.speedup
    return out
