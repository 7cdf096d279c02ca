"""Which of a task's fastest kernels is fastest inside the model (``spatialtune model --rerank-cold K``).

The tuner times a kernel back to back on the same buffers, so its weights stay in the caches
(at two cores each core keeps its half in its own L2). Inside a model the layers before a task
have evicted them, and kernels that tie in cache differ out of it: of the twelve fastest kernels
of a transformer MLP's 2048 -> 512 task, 2.45-2.58 ms each in cache, the fastest took 3.11 ms out
of it where another took 2.76 (docs/models.md). So before a share's model is compiled, the ``K``
fastest distinct kernels each task has at that share are built and timed again in a worker
holding the share, each run alone after a buffer twice the last-level cache was written
(:func:`spatialtune.measure.in_worker.evict`), and the fastest so is the one compiled in. Those
times are not rows of the database: they are a different measure from the one the tuner
optimises and compares across shares, and the model's facts keep them (``cold_s``, and the pick's
place by the tuner's time, ``rank``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable

from ..device import DeviceInfo, target_for
from ..measure.runner import RunSettings
from ..measure.worker import Worker, WorkerError
from ..store.records import Measurement
from ..workloads.schedule import apply_trace
from ..workloads.spec import Workload

log = logging.getLogger(__name__)

_MEASURE = "spatialtune.measure.in_worker:measure_one"


class ColdPicker:
    """``picker(workload, rows)``: of ``rows`` (a task's ok measurements at one share), the one
    whose kernel is fastest with its data out of the caches among the ``top`` fastest distinct
    ones by the tuner's time, with its facts ({cold_s, rank, timed}); None when none could be
    timed (the caller keeps the tuner's pick). One worker holds ``share`` for every task."""

    def __init__(self, device: DeviceInfo, share, env: dict, tmp: str, top: int = 8,
                 settings: RunSettings | None = None, say: Callable[[str], None] = lambda s: None):
        self.device, self.share, self.tmp, self.top, self.say = device, share, tmp, top, say
        self.settings = dataclasses.replace(settings or RunSettings(repeat=15, warmup_ms=20), cold=True)
        self.worker = Worker(init="spatialtune.measure.in_worker:init_measure_worker",
                             init_args=("cpu", share, "cpu"), env=env, name=f"cold-{share.units}core")

    def __call__(self, w: Workload, rows: list[Measurement]) -> tuple[Measurement, dict] | None:
        ranked, seen = [], set()
        for m in sorted((m for m in rows if m.status == "ok" and m.median_s), key=lambda m: m.median_s):
            if m.mod_hash not in seen:
                seen.add(m.mod_hash)
                ranked.append(m)
            if len(ranked) >= self.top:
                break
        timed = [(self._cold(w, m, i), i, m) for i, m in enumerate(ranked)]
        timed = [(t, i, m) for t, i, m in timed if t is not None]
        if not timed:
            return None
        t, i, m = min(timed, key=lambda x: x[0])
        first = next((f"{x[0] * 1e3:.3f} ms" for x in timed if x[1] == 0), "not timed")
        self.say(f"{w.name}: kernel {i + 1} of {len(ranked)} by the tuner's time is fastest out of cache "
                 f"({t * 1e3:.3f} ms; the tuner's first: {first})")
        return m, {"cold_s": t, "rank": i + 1, "timed": len(timed)}

    def _cold(self, w: Workload, m: Measurement, i: int) -> float | None:
        """The kernel of ``m`` built and timed out of cache in the share's worker, or None."""
        import tvm

        from ..workloads.prefetch import before_compile

        try:
            target = target_for(self.device, self.share.units)
            mod = before_compile(apply_trace(w, m.trace).mod, target, w.fast_math)  # as the tuner built it
            path = os.path.join(self.tmp, f"cold-{w.key}-{self.share.units}-{i}.so")
            tvm.compile(mod, target=tvm.target.Target(target)).export_library(path)
            res = self.worker.start().call(_MEASURE, w.to_dict(), path, None, self.settings, 0, timeout=60.0)
        except WorkerError as e:
            if not self.worker.alive:
                self.worker.restart()
            log.warning("%s: kernel %s not timed out of cache (%s)", w.name, m.mod_hash, e)
            return None
        except Exception as e:  # a record that no longer builds: the others still count
            log.warning("%s: kernel %s not rebuilt (%s)", w.name, m.mod_hash, e)
            return None
        return res.get("median_s") if res.get("status") == "ok" else None

    def close(self) -> None:
        self.worker.close()
