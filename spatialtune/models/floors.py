"""ONNX Runtime's time per task of a model at a share, measured before any tuning: the floors the
gradient task scheduler tunes against (:mod:`spatialtune.tuning.scheduler`).

A model is as fast as ONNX Runtime only when each of its tasks is about as fast as ONNX Runtime's
nodes for the same operators, so a task that has reached that time should leave its trials to the
tasks that have not. ``spatialtune model --profile`` gives those times, but only next to tuned
kernels, i.e. after a first tuning run spent its trials without them. Here ONNX Runtime alone is
profiled under each share (in a worker holding the share's cores, as in the end-to-end timing,
:func:`~spatialtune.models.in_worker.profile_onnxruntime`), its nodes are matched to the model's
tasks as the profile breakdown matches them (:func:`~spatialtune.models.profile.breakdown`), and
each task's time per call (its nodes' time over its weight) is stored as the ``onnxruntime``
baseline of the task at that share, where :func:`spatialtune.store.model_runs.vendor_floors`
reads it. A task matched to no node (a layout change ONNX Runtime does elsewhere) gets no floor.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from ..device import detect_cpu
from ..errors import ConfigError
from ..measure.worker import Worker, WorkerError
from ..partitions import create_partition
from ..store.database import TuningDatabase
from ..store.model_runs import FLOOR_KIND
from ..terms import check_ratio, norm_ratio
from .e2e import ModelOptions, random_feeds, share_worker
from .importer import extract_workloads, load_onnx
from .profile import breakdown, call_order, output_sizes


def profile_floors(path: str | Path, ratios: Sequence[float], db: TuningDatabase, *, shapes: dict | None = None,
                   options: ModelOptions | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[float, dict[str, float]]:
    """Profile ONNX Runtime running the model at ``path`` under each share of ``ratios`` and store
    each task's time per call as its floor there (interference ``none``: the condition the
    profile ran in). Returns {share key ratio: {task key: seconds per call}}. A share whose
    profile fails raises :class:`ConfigError` (what is stored for earlier shares stays)."""
    opt = options or ModelOptions()
    say = progress or (lambda s: None)
    ratios = sorted({norm_ratio(check_ratio(r)) for r in ratios}, reverse=True)
    model = load_onnx(path, shapes, opt.layout)
    device = detect_cpu(opt.mcpu)
    partition = create_partition("cpu")
    db.add_device(device)
    tasks = extract_workloads(model, fast_math=opt.fast_math)
    calls = call_order(model, tasks)
    facts = {w.key: {"name": w.name or w.key, "weight": w.weight, "time_s": None} for w in tasks}
    feeds = random_feeds(model, opt.seed)
    out: dict[float, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="spatialtune-floors-") as tmp, partition:
        for r in ratios:
            share = partition.grant(r)
            with Worker(**share_worker(partition, share), name=f"ort-{share.units}core") as w:
                try:
                    prof = w.call("spatialtune.models.in_worker:profile_onnxruntime", model.path, feeds,
                                  opt.settings(), os.path.join(tmp, f"ort-{share.units}"), timeout=opt.timeout)
                except WorkerError as e:
                    raise ConfigError(f"ONNX Runtime's profile of {model.name} at {share.key_ratio:g}%: {e}") from None
            bd = breakdown(share.key_ratio, calls, facts, 0.0, prof, sizes=output_sizes(tasks))
            got = out[share.key_ratio] = {t.key: t.ort_s / t.weight for t in bd.tasks if t.ort_s > 0 and t.weight}
            for key, s in got.items():
                db.record_baseline(key, device.id, partition.kind, share.key_ratio, "none", FLOOR_KIND, s, share.units)
            say(f"{model.name} at {share.key_ratio:g}% ({share.units} cores): ONNX Runtime {prof['total_s'] * 1e3:.3f} ms"
                f" a run; floors for {len(got)} of {len(tasks)} tasks")
    return out
