"""The table and checks of a bundle run, as printed by ``spatialtune bundle run``."""

from __future__ import annotations

from ..terms import regret


def format_table(results: dict) -> str:
    """One table: best config per share, regret of the 100%-best config there, SMs seen, neighbour."""
    ms = [m for m in results["measurements"] if m["status"] == "ok"]
    conds = results["conditions"]
    lines = []
    d = results["device"]
    lines.append(f"device: {d['name']} ({d['units']} SMs, driver {d['driver']}, {d['arch']})")
    hdr = (f"{'workload':<26} {'condition':<26} {'SMs seen':>8} {'ok':>7} {'best':>8} {'best us':>9} "
           f"{'100%-best us':>12} {'regret':>6} {'vs100':>6} {'ideal':>6} {'neighbour':>16} {'load ms':>7} "
           f"{'cuBLAS us':>9} {'best/cuBLAS':>11}")
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
            reg = regret(refm and refm["median_s"], s["best_s"])
            base = ref_best.get(c["partition"]) or (ref and ref["best_s"])
            vs = (s["best_s"] / base) if base and s["best_s"] else None
            nb = f"{s['neighbour']:.0f} {s['neighbour_unit']}" if s.get("neighbour") else "-"
            seen = ",".join(str(x) for x in s["sms_seen"]) or "-"
            best_idx = s["best"].split("/")[-1] if s["best"] else "-"
            lines.append(
                f"{_short(wk):<26} {c['condition']:<26} {seen:>8} {s['ok']:>3}/{s['measured']:<3} "
                f"{'#' + best_idx:>8} {_us(s['best_s']):>9} {_us(refm and refm['median_s']):>12} "
                f"{_x(reg):>6} {_x(vs):>6} {_x(_ideal(d, s)):>6} {nb:>16} "
                f"{(s['median_load_s'] or 0) * 1e3:>7.1f} {_us(s.get('cublas_s')):>9} "
                f"{_x(s['best_s'] / s['cublas_s'] if s.get('cublas_s') and s['best_s'] else None):>11}")
        lines.append(f"  (100%-best config of {_short(wk)}: #{ref_id.split('/')[-1] if ref_id else '-'} at "
                     f"{ref_cond}; regret = its time here / best time here; vs100 = best here / best at the "
                     f"whole device, same partition; ideal = all SMs / SMs seen; cuBLAS = torch's fp32 matmul "
                     f"without TF32 in the same worker, best/cuBLAS < 1: the tuned kernel is faster)")
    return "\n".join(lines)


def _ideal(d: dict, s: dict) -> float | None:
    seen = s.get("sms_seen") or []
    return d["units"] / seen[0] if len(seen) == 1 and seen[0] else None


def check_targets(results: dict) -> list[str]:
    """Checks of a run, one line each: correctness, load time, and how green contexts scale."""
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
    for b in results.get("baselines", []):
        if b["status"] != "ok":
            out.append(f"INFO cuBLAS {b['workload_key']} {b['condition']}: {b['status']}: {b.get('error', '')[:160]}")
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
    return regret(refm and refm["median_s"], best)


def _short(wk: str) -> str:
    return wk if len(wk) <= 26 else wk[:25] + "…"


def _us(s) -> str:
    return f"{s * 1e6:.1f}" if s else "-"


def _x(v) -> str:
    return f"{v:.2f}" if v else "-"


def format_models(results: dict) -> str:
    """The models' table: per model and condition each variant's latency, against the whole-tuned
    compile and ONNX Runtime there; and whether ONNX Runtime ran at all."""
    rows = results.get("model_runs", [])
    hdr = (f"{'model':<22} {'condition':<22} {'variant':<12} {'status':<13} {'latency ms':>10} {'vs whole':>8} "
           f"{'vs ORT':>7} {'rel err':>8} {'tuned':>7}  note")
    lines = [hdr, "-" * len(hdr)]
    for (model, cond) in dict.fromkeys((r["model"], r["condition"]) for r in rows):
        here = {r["variant"]: r for r in rows if r["model"] == model and r["condition"] == cond}
        whole = (here.get("whole-tuned") or {}).get("latency_s")
        ort = (here.get("onnxruntime") or {}).get("latency_s")
        for name, r in here.items():
            lat = r.get("latency_s")
            d = r.get("detail") or {}
            note = f"same kernels as {d['same_as']}" if d.get("same_as") else (r.get("error") or "")[:60]
            tuned = f"{r['tuned_tasks']}/{r['n_tasks']}" if r.get("tuned_tasks") is not None else "-"
            lines.append(f"{_short(model):<22} {cond:<22} {name:<12} {r['status']:<13} "
                         f"{lat * 1e3 if lat else 0:>10.3f} {_x(lat / whole if lat and whole else None):>8} "
                         f"{_x(lat / ort if lat and ort else None):>7} "
                         f"{r['rel_err'] if r.get('rel_err') is not None else float('nan'):>8.1e} {tuned:>7}  {note}")
    lines.append(f"ONNX Runtime on this device: {results.get('onnxruntime') or 'not asked for'}")
    return "\n".join(lines)
