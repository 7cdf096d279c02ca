"""The result tables the CLI prints."""

from __future__ import annotations


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(out)


def format_summary(summary) -> str:
    """The result table of a tuning job: best per (workload, share) and the whole-device config
    measured at each share."""
    rows = []
    for r in summary.results:
        rows.append([r.workload_name or r.workload_key, f"{r.ratio:g}%", f"{r.granted_units} {r.unit}s",
                     str(r.n_trials), fmt_time(r.best_s), fmt_time(r.whole_device_config_s), fmt_ratio(r.regret),
                     fmt_time(r.default_s), fmt_time(r.numpy_s) + (" (faster)" if r.vendor_faster else ""),
                     r.origin or "-"])
    head = (f"device: {summary.device.name} ({summary.device.units} {summary.device.unit}s, {summary.device.id})"
            f"  partition: {summary.partition}  interference: {summary.interference}")
    t = summary.timings
    foot = (f"{t.get('measured', 0)} candidates measured in {summary.elapsed_s:.0f} s"
            f" (search {t['search'] + t['setup']:.0f} s, build {t['build']:.0f} s, run {t['run']:.0f} s,"
            f" train {t['train']:.0f} s, baselines {t['baseline']:.0f} s)")
    if summary.stopped_early:
        foot += "\nstopped by the time budget: run the same command again to continue"
    for gap in summary.matrix_gaps:
        foot += f"\nwinners matrix: {gap}"
    table = text_table(["workload", "share", "granted", "trials", "best", "100%-config here", "regret", "TVM default",
                        "numpy", "best from"], rows)
    return "\n".join([head, table, foot])


def format_best_table(rows, devices: dict, db=None, origin: dict | None = None) -> str:
    if not rows:
        return "no tuned configs in this database"
    out = []
    for b in rows:
        dev = devices.get(b.device_id, {})
        name = ""
        if db is not None:
            w = db.workload(b.workload_key)
            name = w.name if w else ""
        out.append([b.workload_key, name, f"{b.ratio:.4g}%", b.interference, b.partition,
                    f"{dev.get('name', '?')} [{b.device_id}]",
                    f"{b.granted_units} {dev.get('unit', 'unit')}s" if b.granted_units else "-",
                    fmt_time(b.median_s), str(b.n_trials), b.mod_hash,
                    (origin or {}).get((b.workload_key, b.device_id, b.partition, b.ratio, b.interference), "-")])
    return text_table(["workload", "name", "share", "interference", "partition", "device", "granted", "time", "trials",
                       "config", "best from"], out)
