"""The rows the tuning database hands out: one measurement, one best config."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np

from ..terms import norm_ratio
from .schema import decode_trace


@dataclass
class Measurement:
    """One candidate measured (or failed) under one tuning key."""

    workload_key: str
    device_id: str
    partition: str
    ratio: float
    interference: str
    mod_hash: str
    trace: str
    status: str
    error: str = ""
    times: list[float] = field(default_factory=list)
    median_s: float | None = None
    rel_err: float | None = None
    granted_units: int | None = None
    granted_share: float | None = None
    neighbour_throughput: float | None = None
    neighbour_unit: str = ""
    build_s: float | None = None
    run_s: float | None = None
    search_s: float | None = None
    features: np.ndarray | None = None
    source: str = "tune"
    created_at: str = ""
    id: int | None = None

    @property
    def key(self) -> tuple:
        return (self.workload_key, self.device_id, self.partition, norm_ratio(self.ratio), self.interference)


@dataclass(frozen=True)
class BestConfig:
    workload_key: str
    device_id: str
    partition: str
    ratio: float
    interference: str
    measurement_id: int
    median_s: float
    n_trials: int
    mod_hash: str
    trace: str
    granted_units: int | None
    granted_share: float | None
    updated_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MEASUREMENT_COLUMNS = ("id", "workload_key", "device_id", "partition", "ratio", "interference", "mod_hash", "trace", "status",
              "error", "times", "median_s", "rel_err", "granted_units", "granted_share", "neighbour_throughput",
              "neighbour_unit", "build_s", "run_s", "search_s", "features", "source", "created_at")


def measurement_from_row(r: dict[str, Any]) -> Measurement:
    r = dict(r)
    r["times"] = json.loads(r["times"]) if r.get("times") else []
    r["trace"] = decode_trace(r.get("trace"))
    feats = r.pop("features", None)
    r["features"] = np.frombuffer(feats, dtype=np.float32) if feats else None
    r["error"] = r.get("error") or ""
    r["neighbour_unit"] = r.get("neighbour_unit") or ""
    r["source"] = r.get("source") or ""
    return Measurement(**r)


class BestIndexRow(NamedTuple):
    """A best row without its trace (what lookups, merges and exports read)."""

    workload_key: str
    device_id: str
    partition: str
    ratio: float
    interference: str
    measurement_id: int
    median_s: float
    n_trials: int
    mod_hash: str
    granted_units: int | None
    updated_at: str


class SavedCostModel(NamedTuple):
    """A share's cost model as stored: its kind, its own JSON, and how many rows it was fit on."""

    kind: str
    model: str
    n_samples: int
