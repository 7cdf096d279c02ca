"""What a tuning job reports back: per (workload, share) a :class:`ShareResult`, for the job a
:class:`TuneSummary` (what it was asked to do is :mod:`.options`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..device import DeviceInfo
from ..terms import regret


@dataclass
class ShareResult:
    workload_key: str
    workload_name: str
    ratio: float  # the key's ratio (what the share granted, see spatialtune.terms)
    granted_units: int
    unit: str
    best_s: float | None
    n_trials: int
    new_trials: int
    whole_device_config_s: float | None  # the 100%-best config measured at this share
    default_s: float | None  # TVM's untuned default at this share
    numpy_s: float | None
    origin: str = ""  # where the best kernel was first measured (search.policy.Origin.label)

    @property
    def regret(self) -> float | None:
        return regret(self.whole_device_config_s, self.best_s)

    @property
    def vendor_faster(self) -> bool:
        return self.numpy_s is not None and self.best_s is not None and self.numpy_s < self.best_s


@dataclass
class TuneSummary:
    device: DeviceInfo
    partition: str
    interference: str
    results: list[ShareResult]
    elapsed_s: float
    timings: dict[str, float]  # seconds spent in search, build, run, train
    stopped_early: bool = False
    matrix_gaps: list[str] = field(default_factory=list)  # winners-matrix cells left unmeasured, and why
    pending: int = 0  # measurements a deferred runner took to make later (a GPU bundle)
