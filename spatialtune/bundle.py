"""Measurement bundles: search and build on a CPU host, measure on a GPU host, import back.

A GPU host may have no package index and only a runtime-only TVM, numpy and cuda-bindings. So:

- ``build_bundle`` (CPU host, full TVM): candidates from the search, each built to an exported
  ``.so`` plus a cubin (``kernels/<workload>/<mod_hash>.{so,cubin}``), the neighbour kernels'
  cubin, the green-context shim, and ``manifest.json`` (workload specs, traces, mod hashes,
  features for the cost model, target and arch).
- ``run_bundle`` (GPU host): measures every candidate under a list of conditions (partition,
  share, interference) with the same runner and workers as ``tune``, and writes
  ``results.json`` (the device as read there, every measurement) after each condition, so a run
  cut short still leaves what it measured. Imports no database, xgboost or full TVM.
- ``import_results`` (CPU host): records everything in the tuning database and retrains the
  per-share cost models, so the next search round starts from these measurements.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import ConfigError, DeviceError

log = logging.getLogger(__name__)

FORMAT = 1


# ---------------------------------------------------------------- build (CPU host)


def build_bundle(space: str, workload_names: Sequence[str], out: str, *, candidates: int = 32, target: str = "cuda",
                 arch: str = "sm_90", seed: int = 0, build_workers: int = 2, cost_model: str = "random",
                 db_path: str | None = None) -> dict:
    """Search ``candidates`` kernels per workload, build them with cubins, write the manifest."""
    from .builder import BuildInput, LocalBuilder, target_for
    from .cost_model import create_cost_model
    from .device import tvm_version
    from .search import EvolutionarySearch
    from .spec import load_space

    if target != "cuda":
        raise ConfigError("bundles are for GPU hosts: --target cuda")
    if candidates < 1:
        raise ConfigError(f"--candidates must be positive, got {candidates}")
    workloads = load_space(space).select(workload_names)
    tgt = target_for("cuda", arch=arch)
    out_p = Path(out)
    if (out_p / "manifest.json").exists():
        shutil.rmtree(out_p / "kernels", ignore_errors=True)
    out_p.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "space": str(space),
                "target": tgt, "arch": arch, "tvm_version": tvm_version(), "seed": seed, "workloads": {},
                "candidates": []}
    t0 = time.perf_counter()
    with LocalBuilder(out_p / "kernels", workers=build_workers) as builder:
        for w in workloads:
            model = create_cost_model(cost_model, seed=seed) if cost_model == "random" else create_cost_model(cost_model)
            search = EvolutionarySearch(w, tgt, model, batch=candidates, rand_state=seed)
            cands = []
            tries = 0
            while len(cands) < candidates and tries < 6:
                tries += 1
                got = search.ask(candidates - len(cands))
                if not got:
                    break
                search.tell(got, [None] * len(got))  # unmeasured here: keep MetaSchedule's bookkeeping in step
                cands += [c for c in got if all(c.mod_hash != o.mod_hash for o in cands)]
            search.close()
            if not cands:
                raise DeviceError(f"the search produced no candidate for {w.key}")
            wdir = out_p / "kernels" / w.key
            builder.artifact_dir = str(wdir)
            built = builder.build([BuildInput(c.mod_json, c.mod_hash) for c in cands], tgt)
            manifest["workloads"][w.key] = w.to_dict() | {"key": w.key, "flops": w.flops}
            for i, (c, b) in enumerate(zip(cands, built)):
                manifest["candidates"].append({
                    "id": f"{w.key}/{i}", "index": i, "workload_key": w.key, "mod_hash": c.mod_hash, "trace": c.trace,
                    "source": c.source, "search_s": c.search_s, "build_s": b.build_s,
                    "features": None if c.features is None else [float(x) for x in c.features],
                    "artifact": os.path.relpath(b.artifact, out_p) if b.ok else None,
                    "cubin": os.path.relpath(b.cubin, out_p) if b.ok and b.cubin else None,
                    "status": "ok" if b.ok else "build_error", "error": b.error})
            log.info("%s: %d candidates, %d built", w.key, len(cands), sum(b.ok for b in built))
    sup = out_p / "support"
    sup.mkdir(exist_ok=True)
    from .cubin import compile_source
    from .gpu_interference import NEIGHBOUR_CU
    from .gpu_runtime import build_green_shim

    compile_source(NEIGHBOUR_CU, str(sup / "neighbour.cubin"), arch)
    try:
        build_green_shim(str(sup / "green_shim.so"))
        manifest["green_shim"] = "support/green_shim.so"
    except DeviceError as e:  # the GPU host can build it too, if it has a C compiler
        log.warning("%s", e)
    manifest["neighbour_cubin"] = "support/neighbour.cubin"
    manifest["build_s"] = round(time.perf_counter() - t0, 1)
    (out_p / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def load_manifest(bundle: str) -> dict:
    p = Path(bundle) / "manifest.json"
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{bundle}: not a bundle (no manifest.json)") from None
    if m.get("format") != FORMAT:
        raise ConfigError(f"{p}: bundle format {m.get('format')!r}, expected {FORMAT}")
    return m


# ---------------------------------------------------------------- conditions


@dataclass(frozen=True)
class Condition:
    partition: str  # mps | green
    ratio: float | None = None  # percent (mps, or green by ratio)
    sms: int | None = None  # green by SM count
    interference: str = "none"

    @property
    def label(self) -> str:
        amount = f"{self.sms}sm" if self.sms is not None else f"{self.ratio:g}%"
        return f"{self.partition}:{amount}" + ("" if self.interference == "none" else f":{self.interference}")


def parse_condition(text: str) -> Condition:
    """``mps:50``, ``green:64sm``, ``green:48.5``, ``mps:50:compute``, ``mps:50:tenant:mm_1024``."""
    from .interference import check_interference
    from .partition import check_ratio

    parts = text.split(":", 2)
    if len(parts) < 2 or parts[0] not in ("mps", "green"):
        raise ConfigError(f"condition {text!r}: expected PARTITION:SHARE[:INTERFERENCE], e.g. mps:50 or green:64sm")
    amount = parts[1].strip().lower().rstrip("%")
    interf = check_interference(parts[2]) if len(parts) > 2 else "none"
    try:
        if amount.endswith("sm"):
            if parts[0] != "green":
                raise ConfigError(f"condition {text!r}: SM counts are for green contexts (MPS takes percentages)")
            return Condition(parts[0], sms=int(amount[:-2]), interference=interf)
        return Condition(parts[0], ratio=check_ratio(float(amount)), interference=interf)
    except ValueError:
        raise ConfigError(f"condition {text!r}: {parts[1]!r} is not a share") from None


def conditions_from(partition: str, ratios: Sequence[float], interference: Sequence[str]) -> list[Condition]:
    return [Condition(partition, ratio=r, interference=i) for i in interference for r in ratios]


# ---------------------------------------------------------------- run (GPU host)


def run_bundle(bundle: str, out: str, conditions: Sequence[Condition], *, repeat: int = 5, min_repeat_ms: int = 10,
               timeout: float = 20.0, top: int | None = None, seed: int = 0) -> dict:
    """Measure the bundle's candidates under each condition; returns (and writes) the results.

    ``top``: after the first condition, measure only each workload's ``top`` fastest candidates
    of that condition (the first condition should be the whole device).
    """
    from .device import detect_cuda
    from .gpu_partition import create as create_gpu_partition
    from .gpu_interference import register_tenant
    from .runner import LocalRunner, RunInput, RunSettings

    if not conditions:
        raise ConfigError("no conditions to measure")
    man = load_manifest(bundle)
    root = Path(bundle).resolve()
    device = detect_cuda()
    if device.arch != man["arch"]:
        raise DeviceError(f"bundle built for {man['arch']}, this GPU is {device.arch}")
    dev = device.to_dict() | {"tvm_version": man.get("tvm_version", "")}
    if man.get("neighbour_cubin"):
        os.environ.setdefault("SPATIALTUNE_NEIGHBOUR_CUBIN", str(root / man["neighbour_cubin"]))
    if man.get("green_shim") and (root / man["green_shim"]).exists():
        os.environ.setdefault("SPATIALTUNE_GREEN_SHIM", str(root / man["green_shim"]))
    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "manifest.json", out_p / "manifest.json")
    settings = RunSettings(repeat=repeat, min_repeat_ms=min_repeat_ms, timeout=timeout, seed=seed)
    results = {"format": FORMAT, "device": dev, "bundle": str(root), "settings": vars(settings) | {"top": top},
               "conditions": [], "measurements": [], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    cands = man["candidates"]
    pool = {c["id"] for c in cands}
    by_wl = {}
    for c in cands:
        by_wl.setdefault(c["workload_key"], []).append(c)
    t_all = time.perf_counter()
    # Group by partition and keep the order given: a private MPS daemon is stopped before green
    # contexts (non-MPS clients) run.
    order: list[str] = []
    for cond in conditions:
        if cond.partition not in order:
            order.append(cond.partition)
    first = True
    for kind in order:
        part = create_gpu_partition(kind, total_sms=device.units)
        with part, LocalRunner(part, device_kind="cuda", settings=settings) as runner:
            for cond in [c for c in conditions if c.partition == kind]:
                share = part.grant_sms(cond.sms) if cond.sms is not None else part.grant(cond.ratio)
                todo = [c for c in cands if c["id"] in pool and c["status"] == "ok"]
                inputs = [RunInput(man["workloads"][c["workload_key"]], str(root / c["artifact"]),
                                   str(root / c["cubin"]) if c.get("cubin") else None) for c in todo]
                t0 = time.perf_counter()
                if cond.interference.startswith("tenant:"):
                    _register_tenants(results, man, root, register_tenant)
                res = runner.run(share, cond.interference, inputs)
                rows = []
                for c, r in zip(todo, res):
                    rows.append({"candidate": c["id"], "workload_key": c["workload_key"], "mod_hash": c["mod_hash"],
                                 "partition": kind, "ratio": share.ratio, "planned_units": share.units,
                                 "total_units": share.total, "interference": cond.interference,
                                 "condition": cond.label} | r.to_dict())
                if first:
                    for c in cands:
                        if c["status"] != "ok":
                            rows.append({"candidate": c["id"], "workload_key": c["workload_key"],
                                         "mod_hash": c["mod_hash"], "partition": kind, "ratio": share.ratio,
                                         "planned_units": share.units, "total_units": share.total,
                                         "interference": cond.interference, "condition": cond.label,
                                         "status": "build_error", "error": c.get("error", "")})
                results["measurements"] += rows
                summary = _condition_summary(cond, share, rows, time.perf_counter() - t0)
                results["conditions"].append(summary)
                log.info("%s", json.dumps(summary))
                if first and top:
                    pool = set()
                    for wk, cs in by_wl.items():
                        ok = sorted((r for r in rows if r["workload_key"] == wk and r["status"] == "ok"),
                                    key=lambda r: r["median_s"])
                        pool |= {r["candidate"] for r in ok[:top]}
                first = False
                results["elapsed_s"] = round(time.perf_counter() - t_all, 1)
                _write(out_p / "results.json", results)
    return results


def _register_tenants(results: dict, man: dict, root: Path, register) -> None:
    """``tenant:NAME`` runs the best whole-device config measured so far of workload NAME."""
    cand = {c["id"]: c for c in man["candidates"]}
    for wk, w in man["workloads"].items():
        ok = [m for m in results["measurements"] if m["workload_key"] == wk and m["status"] == "ok"
              and m["interference"] == "none"]
        if not ok:
            continue
        top_ratio = max(m["ratio"] for m in ok)
        best = min((m for m in ok if m["ratio"] == top_ratio), key=lambda m: m["median_s"])
        c = cand[best["candidate"]]
        for name in {wk, w.get("name") or wk}:
            register(name, {k: w[k] for k in ("op", "dtype", "params", "name", "model")}, str(root / c["artifact"]),
                     str(root / c["cubin"]) if c.get("cubin") else None)


def _condition_summary(cond: Condition, share, rows: list[dict], elapsed: float) -> dict:
    import numpy as np

    out = {"condition": cond.label, "partition": cond.partition, "ratio": share.ratio, "planned_units": share.units,
           "interference": cond.interference, "elapsed_s": round(elapsed, 1), "workloads": {}}
    for wk in sorted({r["workload_key"] for r in rows}):
        rs = [r for r in rows if r["workload_key"] == wk]
        ok = [r for r in rs if r["status"] == "ok"]
        seen = sorted({r["granted_units"] for r in rs if r.get("granted_units")})
        nb = [r["neighbour_throughput"] for r in rs if r.get("neighbour_throughput")]
        loads = [r["load_s"] for r in rs if r.get("load_s") is not None]
        best = min(ok, key=lambda r: r["median_s"]) if ok else None
        out["workloads"][wk] = {
            "measured": len(rs), "ok": len(ok), "statuses": {s: sum(r["status"] == s for r in rs)
                                                            for s in sorted({r["status"] for r in rs})},
            "best": best and best["candidate"], "best_s": best and best["median_s"], "sms_seen": seen,
            "max_rel_err": max((r["rel_err"] for r in ok if r.get("rel_err") is not None), default=None),
            "median_load_s": float(np.median(loads)) if loads else None,
            "neighbour": float(np.median(nb)) if nb else None,
            "neighbour_unit": next((r["neighbour_unit"] for r in rs if r.get("neighbour_unit")), "")}
    return out


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def load_results(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no results.json") from None


# ---------------------------------------------------------------- report


def format_table(results: dict) -> str:
    """One table: best config per share, regret of the 100%-best config there, SMs seen, neighbour."""
    ms = [m for m in results["measurements"] if m["status"] == "ok"]
    conds = results["conditions"]
    lines = []
    d = results["device"]
    lines.append(f"device: {d['name']} ({d['units']} SMs, driver {d['driver']}, {d['arch']})")
    hdr = (f"{'workload':<26} {'condition':<26} {'SMs seen':>8} {'ok':>7} {'best':>8} {'best us':>9} "
           f"{'100%-best us':>12} {'regret':>6} {'vs100':>6} {'ideal':>6} {'neighbour':>16} {'load ms':>7}")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    wks = list(dict.fromkeys(m["workload_key"] for m in results["measurements"]))
    for wk in wks:
        # the reference config: best of the first whole-device condition without a neighbour
        full = [c for c in conds if c["interference"] == "none" and c["planned_units"] >= d["units"]
                and wk in c["workloads"]]
        ref = full[0]["workloads"][wk] if full else None
        ref_cond = full[0]["condition"] if full else None
        ref_id = ref and ref["best"]
        ref_best = {}
        for c in full:
            ref_best[c["partition"]] = c["workloads"][wk]["best_s"]
        for c in conds:
            s = c["workloads"].get(wk)
            if s is None:
                continue
            here = [m for m in ms if m["workload_key"] == wk and m["condition"] == c["condition"]]
            refm = next((m for m in here if m["candidate"] == ref_id), None)
            regret = (refm["median_s"] / s["best_s"]) if refm and s["best_s"] else None
            base = ref_best.get(c["partition"]) or (ref and ref["best_s"])
            vs = (s["best_s"] / base) if base and s["best_s"] else None
            nb = f"{s['neighbour']:.0f} {s['neighbour_unit']}" if s.get("neighbour") else "-"
            seen = ",".join(str(x) for x in s["sms_seen"]) or "-"
            best_idx = s["best"].split("/")[-1] if s["best"] else "-"
            lines.append(
                f"{_short(wk):<26} {c['condition']:<26} {seen:>8} {s['ok']:>3}/{s['measured']:<3} "
                f"{'#' + best_idx:>8} {_us(s['best_s']):>9} {_us(refm and refm['median_s']):>12} "
                f"{_x(regret):>6} {_x(vs):>6} {_x(_ideal(d, s)):>6} {nb:>16} "
                f"{(s['median_load_s'] or 0) * 1e3:>7.1f}")
        lines.append(f"  (100%-best config of {_short(wk)}: #{ref_id.split('/')[-1] if ref_id else '-'} at "
                     f"{ref_cond}; regret = its time here / best time here; vs100 = best here / best at the "
                     f"whole device, same partition; ideal = all SMs / SMs seen)")
    return "\n".join(lines)


def _ideal(d: dict, s: dict) -> float | None:
    seen = s.get("sms_seen") or []
    return d["units"] / seen[0] if len(seen) == 1 and seen[0] else None


# What the H200 probe saw with 48 random candidates (shared/reference/gpu-probe-h200.md).
PROBE_REGRET = {("M1024", 25): 1.27, ("M1024", 12): 1.29, ("M128", 25): 1.56, ("M128", 12): 1.68}


def check_targets(results: dict) -> list[str]:
    """The issue's targets, one line each: correctness, load time, regret, green scaling."""
    import numpy as np

    out = []
    ms = results["measurements"]
    d = results["device"]
    bad = [m for m in ms if m["status"] == "wrong_result"]
    ok = [m for m in ms if m["status"] == "ok"]
    errs = [m["rel_err"] for m in ok if m.get("rel_err") is not None]
    stat = {s: sum(m["status"] == s for m in ms) for s in sorted({m["status"] for m in ms})}
    out.append(f"CHECK correctness: {len(ok)} ok, max rel err {max(errs, default=float('nan')):.2g}; statuses {stat}"
               + ("" if not bad else f"; {len(bad)} wrong results (never timed)"))
    loads = [m["load_s"] for m in ms if m.get("load_s") is not None]
    if loads:
        med, p95 = float(np.median(loads)) * 1e3, float(np.percentile(loads, 95)) * 1e3
        out.append(f"CHECK load per candidate: median {med:.1f} ms, p95 {p95:.1f} ms -> "
                   f"{'PASS' if med < 20 else 'FAIL'} (< 20 ms)")
    conds = {c["condition"]: c for c in results["conditions"]}
    for c in results["conditions"]:
        if c["partition"] != "mps" or c["interference"] != "none" or c["ratio"] not in (25.0, 12.0):
            continue
        for wk in c["workloads"]:
            reg = _regret(results, wk, c["condition"])
            probe = next((v for (tag, r), v in PROBE_REGRET.items() if f"_{tag}_" in wk and r == int(c["ratio"])),
                         None)
            verdict = "-" if reg is None or probe is None else ("PASS" if reg >= probe - 1e-9 else "BELOW")
            out.append(f"CHECK regret {wk} {c['condition']}: {_x(reg)} (probe {_x(probe)}) -> {verdict}")
    full = next((c for c in results["conditions"] if c["partition"] == "green" and c["interference"] == "none"
                 and c["planned_units"] >= d["units"]), None)
    if full:
        for c in results["conditions"]:
            if c["partition"] != "green" or c is full or c["interference"] != "none":
                continue
            for wk, s in c["workloads"].items():
                base = full["workloads"].get(wk, {}).get("best_s")
                if not base or not s["best_s"] or not s["sms_seen"]:
                    continue
                slow, ideal = s["best_s"] / base, d["units"] / s["sms_seen"][0]
                dev = slow / ideal - 1
                mps = _nearest_mps(results, wk, s["sms_seen"][0])
                note = f"; MPS with {mps[0]} SMs seen: {mps[1]:.2f}x" if mps else ""
                out.append(f"INFO green {wk} {c['condition']}: best-kernel slowdown {slow:.2f}x vs SM ratio "
                           f"{ideal:.2f}x ({dev:+.0%}){note} (a matmul that does not fill the GPU scales "
                           f"sublinearly; the SM-count check is the FMA calibration)")
    del conds
    return out


def _nearest_mps(results: dict, wk: str, sms: int):
    """(SMs seen, slowdown of the best kernel) of the MPS condition closest in SMs, no neighbour."""
    cs = [c for c in results["conditions"] if c["partition"] == "mps" and c["interference"] == "none"
          and wk in c["workloads"] and c["workloads"][wk]["sms_seen"]]
    full = next((c for c in cs if c["planned_units"] >= results["device"]["units"]), None)
    if not cs or full is None:
        return None
    c = min(cs, key=lambda c: abs(c["workloads"][wk]["sms_seen"][0] - sms))
    return c["workloads"][wk]["sms_seen"][0], c["workloads"][wk]["best_s"] / full["workloads"][wk]["best_s"]


def _regret(results: dict, wk: str, cond: str) -> float | None:
    first = next((c for c in results["conditions"] if c["interference"] == "none"
                  and c["planned_units"] >= results["device"]["units"] and wk in c["workloads"]), None)
    if first is None:
        return None
    ref = first["workloads"][wk]["best"]
    here = [m for m in results["measurements"] if m["workload_key"] == wk and m["condition"] == cond
            and m["status"] == "ok"]
    if not here:
        return None
    best = min(m["median_s"] for m in here)
    refm = next((m for m in here if m["candidate"] == ref), None)
    return refm["median_s"] / best if refm else None


def _short(wk: str) -> str:
    return wk if len(wk) <= 26 else wk[:25] + "…"


def _us(s) -> str:
    return f"{s * 1e6:.1f}" if s else "-"


def _x(v) -> str:
    return f"{v:.2f}" if v else "-"


# ---------------------------------------------------------------- import (CPU host)


def import_results(results_path: str, db, *, cost_model: str = "xgb") -> dict:
    """Record a bundle run in ``db`` (a TuningDatabase) and retrain the touched cost models."""
    import numpy as np

    from .cost_model import create_cost_model
    from .database import Measurement
    from .device import DeviceInfo
    from .spec import Workload

    res = load_results(results_path)
    rdir = Path(results_path) if Path(results_path).is_dir() else Path(results_path).parent
    man_p = rdir / "manifest.json"
    man = json.loads(man_p.read_text()) if man_p.exists() else load_manifest(res["bundle"])
    dev = DeviceInfo.from_dict(res["device"])
    if dev.kind != "cuda" or not dev.units:
        raise ConfigError(f"{results_path}: the results do not describe a GPU")
    db.add_device(dev)
    for w in man["workloads"].values():
        db.add_workload(Workload.from_dict(w))
    cand = {c["id"]: c for c in man["candidates"]}
    added = skipped = 0
    keys = set()
    for m in res["measurements"]:
        c = cand.get(m["candidate"])
        if c is None:
            raise ConfigError(f"{results_path}: measurement of unknown candidate {m['candidate']!r}")
        total = m.get("total_units") or dev.units
        units = m.get("granted_units") or m.get("planned_units")
        meas = Measurement(
            workload_key=m["workload_key"], device_id=dev.id, partition=m["partition"], ratio=m["ratio"],
            interference=m["interference"], mod_hash=c["mod_hash"], trace=c["trace"], status=m["status"],
            error=m.get("error", ""), times=m.get("times") or [], median_s=m.get("median_s"),
            rel_err=m.get("rel_err"), granted_units=units, granted_share=(units / total) if units else None,
            neighbour_throughput=m.get("neighbour_throughput"), neighbour_unit=m.get("neighbour_unit", ""),
            build_s=c.get("build_s"), run_s=m.get("run_s"), search_s=c.get("search_s"),
            features=None if c.get("features") is None else np.asarray(c["features"], dtype=np.float32),
            source="bundle")
        if db.record(meas) is None:
            skipped += 1
        else:
            added += 1
        keys.add((dev.id, m["partition"], m["ratio"], m["interference"]))
    trained = 0
    for device_id, partition, ratio, interference in sorted(keys):
        rows = [r for r in db.measurements(device_id=device_id, partition=partition, ratio=ratio,
                                           interference=interference, status="ok", with_features=True)
                if r.features is not None]
        if len(rows) < 2:
            continue
        model = create_cost_model(cost_model)
        model.fit(np.stack([r.features for r in rows]), [r.median_s for r in rows], [r.workload_key for r in rows])
        db.save_cost_model(device_id, partition, ratio, interference, model.kind, model.to_json(), len(rows))
        trained += 1
    return {"device_id": dev.id, "device": dev.name, "added": added, "skipped": skipped, "keys": len(keys),
            "cost_models": trained}
