"""What scripts/bench_search.py reads out of each method's trials (rows in measurement order, see
bench_search_methods): the pick at a trial or wall-time budget, the trials and seconds to reach a
bar, the cost of a whole multi-share job, and the median and spread over seeds.

A pick at budget B sees only the rows measured by B, with each kernel's first measurement:
what the method knew then. Nothing here measures."""
from __future__ import annotations

import numpy as np

# the methods each job family runs at a set of shares, first share first: spatialtune tunes the
# shares one after another into one database; tune_tir once per share from an empty database, or
# (warm) each share from the database its earlier shares filled
FAMILIES = {"spatialtune": ("spatialtune", "spatialtune"),
            "tune_tir per share": ("tune_tir", "tune_tir-scratch"),
            "tune_tir warm": ("tune_tir", "tune_tir")}


def best_after(rows: list[dict], n: int) -> dict | None:
    """The fastest of the first ``n`` trials, by their first measurements."""
    ok = [r for r in rows[:n] if r["t"] is not None]
    return min(ok, key=lambda r: r["t"]) if ok else None


def best_by_wall(rows: list[dict], seconds: float) -> dict | None:
    """The fastest of the trials measured within ``seconds`` of the method's start."""
    ok = [r for r in rows if r["t"] is not None and r.get("at_s") is not None and r["at_s"] <= seconds]
    return min(ok, key=lambda r: r["t"]) if ok else None


def reach(rows: list[dict], bar: float) -> tuple[int, float | None] | None:
    """(trials, seconds) until a trial's first measurement is within 95 % of ``bar``, or None."""
    for i, r in enumerate(rows, 1):
        if r["t"] is not None and r["t"] <= bar / 0.95:
            return i, r.get("at_s")
    return None


def final_best(rows: list[dict]) -> float | None:
    return min((r["t"] for r in rows if r["t"] is not None), default=None)


def trials_to_95(rows: list[dict], final: float | None = None) -> int | None:
    """Trials to 95 % of ``final`` (default: the method's own final best)."""
    final = final or final_best(rows)
    hit = reach(rows, final) if final else None
    return hit[0] if hit else None


def common_bar(have: dict[str, list[dict]]) -> float | None:
    """The fastest time in ``have`` (method -> rows) of any method but the stock tune_tir (its
    search's times come from another runner and are not comparable)."""
    bests = [final_best(rows) for m, rows in have.items() if not m.endswith("-stock")]
    bests = [b for b in bests if b is not None]
    return min(bests) if bests else None


def job_cost(finals: list[dict]) -> dict[str, tuple[int, float] | None]:
    """For one workload and seed, its shares' finals (first share first): per family, the trials
    and seconds summed over the shares until each share's common bar was reached, None where
    some share did not reach it (or a method did not run)."""
    out: dict[str, tuple[int, float] | None] = {}
    for fam, (first, later) in FAMILIES.items():
        n, s = 0, 0.0
        for i, d in enumerate(finals):
            hit = d.get("reach", {}).get(first if i == 0 else later)
            if hit is None or hit[1] is None:
                n = None
                break
            n, s = n + hit[0], s + hit[1]
        out[fam] = None if n is None or not finals else (n, s)
    return out


def med(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def spread(xs) -> float | None:
    """Half the range over the median (0.05: the seeds lie within ±5 % of their median)."""
    xs = [x for x in xs if x is not None]
    m = med(xs)
    return (max(xs) - min(xs)) / 2 / m if len(xs) > 1 and m else None


def vs_vendor(d: dict, pick: dict) -> float | None:
    """The faster vendor anchor's time over the pick's: per round the faster of numpy and ONNX
    Runtime, then the median of the rounds' ratios (passes without rounds: the ratio of the
    two times)."""
    rounds = pick.get("rounds")
    ns, os_ = d.get("numpy_rounds") or [], d.get("ort_rounds") or []
    if rounds and (ns or os_):
        vendor = [min([v for v in (n, o) if v], default=None)
                  for n, o in zip(ns or [None] * len(rounds), os_ or [None] * len(rounds))]
        if len(vendor) == len(rounds):
            return med([v / t for v, t in zip(vendor, rounds) if v and t])
    best = min([v for v in (d.get("numpy_s"), d.get("ort_s")) if v], default=None)
    return best / pick["t"] if best and pick.get("t") else None
