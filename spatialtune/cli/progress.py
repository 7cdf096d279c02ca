"""The progress bar of ``spatialtune tune``: one line per (workload, share), redrawn in place."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .tables import fmt_time


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
