"""End-to-end model latencies in the database (``model_runs``, schema v4).

``spatialtune model`` compiles a whole model several ways and runs each under a share; every
variant's latency is one row here, so the report (a layer that may not import the models package)
reads them through the store like every other number it shows. Runs are kept, not overwritten:
the report shows the latest run of each (model, device, partition, share).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

VARIANTS = ("share-tuned", "whole-tuned", "untuned", "onnxruntime")
"""share-tuned: every task's best config at this share; whole-tuned: the configs best at 100 %;
untuned: TVM's default compilation; onnxruntime: ONNX Runtime on the same cores."""


@dataclass
class ModelRun:
    run: str  # one invocation of `spatialtune model`: its rows share this id
    model: str
    model_hash: str  # sha256 of the ONNX file, 16 hex digits
    device_id: str
    partition: str
    ratio: float  # the share's key ratio
    variant: str
    status: str  # ok | wrong_result | error
    granted_units: int | None = None
    error: str = ""
    latency_s: float | None = None  # median of the rounds
    times: list[float] = field(default_factory=list)  # one per interleaved round
    rel_err: float | None = None  # against ONNX Runtime's outputs
    tuned_tasks: int | None = None  # tasks that had a config for this variant
    n_tasks: int | None = None
    trials: int | None = None  # trials measured for the configs this variant used
    # per task: weight, kernel time (what costs most); same_as: the variant whose kernels these are
    # (timed once, numbers repeated); profile (share-tuned, with --profile): models.profile.Breakdown
    detail: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def vendor_s(self) -> float | None:
        """What a variant is compared with. ONNX Runtime's row: its latency in the interleaved
        rounds, run as users run it (``detail["spinning"]``: threads spinning, in a process of its
        own); rows written before that timed it with threads blocking in the variants' process and
        again alone after the rounds (``detail["spinning_s"]``), and take the faster. Other rows:
        their latency."""
        if self.variant != "onnxruntime":
            return self.latency_s
        return min((t for t in (self.latency_s, self.detail.get("spinning_s")) if t), default=None)

    def costliest_task(self) -> dict[str, Any] | None:
        """Of the tasks whose configs this run used (``detail["tasks"]``), the one whose weight x
        kernel time is largest, with ``part``: its share of the sum."""
        tasks = [t for t in self.detail.get("tasks", {}).values() if t.get("time_s")]
        if not tasks:
            return None
        total = sum(t["weight"] * t["time_s"] for t in tasks)
        top = max(tasks, key=lambda t: t["weight"] * t["time_s"])
        return top | {"part": top["weight"] * top["time_s"] / total}


_COLS = ("run", "model", "model_hash", "device_id", "partition", "ratio", "granted_units", "variant", "status",
         "error", "latency_s", "times", "rel_err", "tuned_tasks", "n_tasks", "trials", "detail", "created_at")


def record_model_run(db, r: ModelRun) -> int:
    """Store one variant's result (``db``: a TuningDatabase); returns its row id."""
    if r.variant not in VARIANTS:
        raise ValueError(f"unknown model-run variant {r.variant!r} (known: {', '.join(VARIANTS)})")
    r.created_at = r.created_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    vals = {c: getattr(r, c) for c in _COLS} | {"times": json.dumps(r.times), "detail": json.dumps(r.detail)}
    with db.db.atomic():
        cur = db.db.execute(f"INSERT INTO model_runs ({', '.join(_COLS)}) VALUES ({', '.join('?' for _ in _COLS)})",
                            [vals[c] for c in _COLS])
    r.id = cur.lastrowid
    return r.id


def model_runs(db, *, model: str | None = None, latest: bool = False) -> list[ModelRun]:
    """Rows in the order they were written; ``latest``: only the newest run's rows of each
    (model, device, partition, share)."""
    where, args = ("WHERE model = ?", [model]) if model else ("", [])
    rows = [dict(r) for r in db.db.query(f"SELECT * FROM model_runs {where} ORDER BY id", args)]
    out = []
    for r in rows:
        r["times"] = json.loads(r["times"]) if r.get("times") else []
        r["detail"] = json.loads(r["detail"]) if r.get("detail") else {}
        r["error"] = r.get("error") or ""
        out.append(ModelRun(**r))
    if latest:
        newest: dict[tuple, str] = {}
        for m in out:
            newest[(m.model, m.device_id, m.partition, m.ratio)] = m.run
        out = [m for m in out if newest[(m.model, m.device_id, m.partition, m.ratio)] == m.run]
    return out


FLOOR_KIND = "onnxruntime"
"""The baseline kind ONNX Runtime's time per task is stored under (:mod:`spatialtune.models.floors`)."""


def vendor_floors(db, device_id: str, partition: str, ratio: float) -> dict[str, float]:
    """Per task (workload key), the time ONNX Runtime took per call for the operators matched to
    it at this share: from the newest profiled run of each model (``spatialtune model
    --profile``) and from ONNX Runtime profiled alone before tuning (``spatialtune model
    --floors``, stored as the task's ``onnxruntime`` baseline); the lowest where several models
    run the task. What the gradient scheduler treats as a task's floor
    (:mod:`spatialtune.tuning.scheduler`)."""
    out: dict[str, float] = {}
    for b in db.baselines(device_id=device_id, partition=partition, ratio=ratio, kind=FLOOR_KIND):
        if b["median_s"] > 0:
            out[b["workload_key"]] = min(b["median_s"], out.get(b["workload_key"], b["median_s"]))
    for m in model_runs(db, latest=True):
        prof = m.detail.get("profile") if m.variant == "share-tuned" else None
        if not prof or m.device_id != device_id or m.partition != partition or m.ratio != ratio:
            continue
        for t in prof.get("tasks", []):
            if t.get("key") and t.get("weight") and t.get("ort_s", 0) > 0:
                per_call = t["ort_s"] / t["weight"]
                out[t["key"]] = min(per_call, out.get(t["key"], per_call))
    return out
