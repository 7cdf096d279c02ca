"""Terminal output of the tuning CLI: the progress bar and the result tables."""

from __future__ import annotations

import sys
import time
from typing import TextIO


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


class Progress:
    """One line per (workload, share) on a terminal, redrawn in place; plain lines elsewhere."""

    def __init__(self, total_jobs: int, stream: TextIO | None = None, width: int = 24):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.total_jobs, self.width = total_jobs, width
        self.t0 = time.perf_counter()
        self._last_key = None

    def update(self, ev: dict) -> None:
        wi, nw, ri, nr = ev["position"]
        job = wi * nr + ri + 1
        frac = min(1.0, ev["trials"] / max(1, ev["budget"]))
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        best = ev["best_s"]
        gflops = f" {ev['flops'] / best / 1e9:.1f} GFLOP/s" if best else ""
        line = (f"[{job}/{self.total_jobs}] {ev['workload']} @ {ev['share']} [{bar}] {ev['trials']}/{ev['budget']}"
                f" trials  best {fmt_time(best)}{gflops}  {time.perf_counter() - self.t0:.0f}s")
        key = (ev["key"], ev["ratio"])
        if self.tty:
            if self._last_key is not None and key != self._last_key:
                self.stream.write("\n")
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self._last_key = key
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._last_key is not None:
            self.stream.write("\n")
            self.stream.flush()


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def format_summary(summary) -> str:
    """The result table of a tuning job: best per (workload, share) and the whole-device config
    measured at each share."""
    rows = []
    for r in summary.results:
        rows.append([r.workload_name or r.workload_key, f"{r.ratio:g}%", f"{r.granted_units} {r.unit}s",
                     str(r.n_trials), fmt_time(r.best_s), fmt_time(r.whole_device_config_s), fmt_ratio(r.regret),
                     fmt_time(r.default_s), fmt_time(r.numpy_s)])
    head = (f"device: {summary.device.name} ({summary.device.units} {summary.device.unit}s, {summary.device.id})"
            f"  partition: {summary.partition}  interference: {summary.interference}")
    t = summary.timings
    foot = (f"{t.get('measured', 0)} candidates measured in {summary.elapsed_s:.0f} s"
            f" (search {t['search'] + t['setup']:.0f} s, build {t['build']:.0f} s, run {t['run']:.0f} s,"
            f" train {t['train']:.0f} s, baselines {t['baseline']:.0f} s)")
    if summary.stopped_early:
        foot += "\nstopped by the time budget: run the same command again to continue"
    table = _table(["workload", "share", "granted", "trials", "best", "100%-config here", "regret", "TVM default",
                    "numpy"], rows)
    return "\n".join([head, table, foot])


def format_best_table(rows, devices: dict, db=None) -> str:
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
                    fmt_time(b.median_s), str(b.n_trials), b.mod_hash])
    return _table(["workload", "name", "share", "interference", "partition", "device", "granted", "time", "trials",
                   "config"], out)
