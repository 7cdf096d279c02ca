"""What measuring for one tuning key needs, as one object (MetaSchedule's ``TuneContext`` plays
this part there): the database the results go to, the builder and the runner, the workload, the
share held while measuring, the key its rows are recorded under and the target it is built for.
Steps that measure for a key outside the search (confirming its winners) take it whole instead of
seven arguments that always travel together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TuneContext:
    db: Any  # store.database.TuningDatabase
    builder: Any  # measure.builder.LocalBuilder
    runner: Any  # measure.runner.Runner
    workload: Any  # workloads.spec.Workload
    share: Any  # partitions.Share
    key: dict  # the tuning key's columns: workload_key, device_id, partition, ratio, interference
    target: dict
