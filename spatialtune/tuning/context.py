"""What the parts of a ``tune`` call share, as MetaSchedule's ``TuneContext`` does there.

:class:`Context`: everything one call shares: the device and partition measured on, the options,
the builder and runner, the stage timings, the progress callback, the deadline, and the
measurements a deferred runner has taken but not yet made, and the steps after every measured
batch (:mod:`.after_batch`). :class:`TuneContext`: what measuring
for one tuning key needs (the database the results go to, the builder and the runner, the
workload, the share held while measuring, the key its rows are recorded under and the target it
is built for): steps that measure for a key outside the search (confirming its winners) take it
whole instead of seven arguments that always travel together."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..device import DeviceInfo
from ..measure.builder import Builder
from ..measure.runner import Runner
from ..partitions import Partition
from .lanes import ProgressFn
from .options import TuneOptions

KEY_FIELDS = ("workload_key", "device_id", "partition", "ratio", "interference")


class Stage:
    """Seconds per stage and counts, added to from every thread of a job."""

    def __init__(self):
        self.t = {"setup": 0.0, "search": 0.0, "build": 0.0, "run": 0.0, "train": 0.0, "baseline": 0.0}
        self.counts = {"built": 0, "measured": 0}
        self.gaps: list[str] = []  # winners-matrix cells that could not be measured, and why
        self._lock = threading.Lock()  # workloads tuned in threads add to the same totals

    def add(self, k: str, dt: float) -> None:
        with self._lock:
            self.t[k] += dt

    def count(self, k: str, n: int) -> None:
        with self._lock:
            self.counts[k] += n


@dataclass
class Context:
    device: DeviceInfo
    partition: Partition
    opt: TuneOptions
    builder: Builder
    runner: Runner
    progress: ProgressFn | None = None
    deadline: float | None = None
    stage: Stage = field(default_factory=Stage)
    # key (KEY_FIELDS values) -> mod hashes handed to a deferred runner in this call: they count
    # toward the key's budget and are not handed out again, but they are not in the database
    pending: dict[tuple, set[str]] = field(default_factory=dict)
    # the after-batch steps every batch goes through, whichever runner measures it (.after_batch)
    after_batch: list = field(default_factory=list)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def add_pending(self, key: dict, mod_hash: str) -> None:
        self.pending.setdefault(tuple(key[f] for f in KEY_FIELDS), set()).add(mod_hash)

    def pending_at(self, key: dict) -> set[str]:
        return self.pending.get(tuple(key[f] for f in KEY_FIELDS), set())

    def n_pending(self) -> int:
        return sum(len(v) for v in self.pending.values())


@dataclass(frozen=True)
class TuneContext:
    db: Any  # store.database.TuningDatabase
    builder: Any  # measure.builder.LocalBuilder
    runner: Any  # measure.runner.Runner
    workload: Any  # workloads.spec.Workload
    share: Any  # partitions.Share
    key: dict  # the tuning key's columns: workload_key, device_id, partition, ratio, interference
    target: dict
