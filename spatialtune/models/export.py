"""A compiled model per share, for schedulers: ``spatialtune model export``.

A scheduler that resizes a tenant needs the model compiled for the share it grants, ready before
it grants it: compiling a model takes seconds, the swap must not. :func:`export_model` compiles
the model once per share with each task's best config at that share (:func:`.compile.records_for`,
:func:`.compile.compile_model`, the same build ``spatialtune model`` times) and writes

- one shared library per share (the Relax VM executable, ``export_library``), and
- ``manifest.json``: the model (name, sha256, inputs), the device it was compiled for (its id:
  a library built for another CPU model or TVM is not this one), the partition, and per share
  the granted cores, the thread count the variant is meant to run with (on a core set, one
  thread per granted core: the count the kernels were tuned with), its file, each task's config
  provenance (workload key, measurement id, mod_hash, the share it was tuned at) and the
  end-to-end latencies ``spatialtune model`` measured for it (``model_runs``), if any.

The manifest is written last, through a rename, so a reader never sees one that names a library
not yet written. ``spatialtune.lookup.ModelLookup`` reads it without TVM.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..device import detect_cpu, target_for
from ..errors import ConfigError
from ..partitions import create_partition
from ..store.database import TuningDatabase
from ..store.exports import FORMAT, MANIFEST, VERSION, whole_outran
from ..store.model_runs import model_runs
from ..terms import check_interference, check_ratio, norm_ratio
from .compile import compile_model, records_for
from .importer import extract_workloads, load_onnx


@dataclass(frozen=True)
class ExportOptions:
    shapes: dict | None = None  # static input shapes, as given to workloads --from-onnx
    layout: str = "auto"  # the convolutions' layout the tasks were extracted with (models.layout)
    mcpu: str | None = None  # the device whose tuning records are used (default: this machine's CPU)
    interference: str = "none"  # whose records: the condition they were tuned under


def export_model(path: str | Path, ratios: Sequence[float], db: TuningDatabase, out: str | Path,
                 options: ExportOptions = ExportOptions(), progress: Callable[[str], None] | None = None) -> dict:
    """Compile the model at ``path`` once per share of ``ratios`` into ``out``; returns the manifest.

    Shares that grant the same cores (25 % and 50 % of two cores are both one core) are one
    variant, listing every ratio asked for it. A task with no config at a share runs untuned in
    that variant (its provenance says so, and ``tuned_tasks`` counts the others)."""
    say = progress or (lambda s: None)
    interference = check_interference(options.interference)
    asked = sorted({norm_ratio(check_ratio(r)) for r in ratios})
    if not asked:
        raise ConfigError("no shares to export the model at")
    model = load_onnx(path, options.shapes, options.layout)
    device = detect_cpu(options.mcpu)
    partition = create_partition("cpu")
    shares: dict[float, dict] = {}
    for r in asked:
        share = partition.grant(r)
        v = shares.setdefault(share.key_ratio, {"ratio": share.key_ratio, "asked": [], "granted_units": share.units})
        v["asked"].append(r)
    tasks = extract_workloads(model)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create it ({e.strerror})") from None
    runs = [r for r in model_runs(db, model=model.name) if r.model_hash == model.hash
            and r.device_id == device.id and r.partition == partition.kind]
    variants = []
    whole = records_for(db, tasks, device, partition.kind, 100.0, interference)
    for key_ratio in sorted(shares):
        v = shares[key_ratio]
        t0 = time.perf_counter()
        own = whole if key_ratio == 100.0 else records_for(db, tasks, device, partition.kind, key_ratio, interference)
        plans = {"share-tuned": (key_ratio, own), "whole-tuned": (100.0, whole)}
        hashes = {name: {w.key: facts.get(w.key, {}).get("mod_hash") for w in tasks}
                  for name, (_, (_, facts)) in plans.items()}
        v["latencies"] = _latencies([r for r in runs if r.ratio == key_ratio], hashes)
        v["compiled"], why = ships(v["latencies"])
        if why:
            v["why"] = why
        ratio, (msdb, facts) = plans[v["compiled"]]
        v["file"] = f"{model.name}-{key_ratio:g}pct-{v['granted_units']}core.so"
        _, applied = compile_model(model, target_for(device, v["granted_units"]), msdb, str(out / v["file"]))
        v["threads"] = v["granted_units"]
        v["tuned_tasks"], v["n_tasks"] = applied, len(tasks)
        v["tasks"] = _provenance(db, tasks, facts, device.id, partition.kind, ratio, interference)
        say(f"{key_ratio:g}% ({v['granted_units']} cores): {applied} of {len(tasks)} tasks tuned, "
            f"{v['file']} in {time.perf_counter() - t0:.1f} s" + (f"; {why}" if why else ""))
        variants.append(v)
    manifest = {"format": FORMAT, "version": VERSION,
                "model": {"name": model.name, "hash": model.hash, "file": Path(model.path).name,
                          "layout": model.layout,
                          "inputs": [{"name": n, "shape": list(s), "dtype": dt} for n, s, dt in model.inputs],
                          "outputs": model.outputs},
                "device": device.to_dict(), "partition": partition.kind, "interference": interference,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "variants": variants}
    tmp = out / f".{MANIFEST}.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


def _provenance(db: TuningDatabase, tasks, facts: dict, device_id: str, partition: str, ratio: float,
                interference: str) -> list[dict]:
    """Per task, the config compiled in: the measurement it came from, or nulls for a task that
    runs untuned (no config at this share, or one that does not replay)."""
    out = []
    for w in tasks:
        f = facts.get(w.key, {})
        row = {"workload_key": w.key, "name": w.name, "weight": w.weight, "measurement_id": None,
               "mod_hash": None, "tuned_ratio": None, "time_s": None}
        if f.get("mod_hash"):
            best = db.best(workload_key=w.key, device_id=device_id, partition=partition, ratio=ratio,
                           interference=interference)
            b = next((b for b in best if b.mod_hash == f["mod_hash"]), None)
            if b is not None:
                row |= {"measurement_id": b.measurement_id, "mod_hash": b.mod_hash, "tuned_ratio": b.ratio,
                        "time_s": b.median_s}
        out.append(row)
    return out


def ships(latencies: list[dict]) -> tuple[str, str]:
    """(the compile a share ships, why if not its own): the share-tuned one, unless the newest run
    at that share, without a neighbour, timed the 100%-tuned one faster by more than
    ``store.exports.NOISE`` (:func:`~spatialtune.store.exports.whole_outran`), both ``ok`` and
    both with the configs that would be exported now. Each task's pick is the fastest kernel
    measured at the share, timed alone; inside the model a kernel can lose what it does not alone
    (its weights evicted by the layers before it), so a share may run the 100 % picks faster, and
    a scheduler is handed the compile measured faster there."""
    by = {x["variant"]: x for x in latencies if x["interference"] == "none"}
    st, wt = by.get("share-tuned"), by.get("whole-tuned")
    if st and wt and st.get("same_configs") and wt.get("same_configs") and whole_outran(st, wt):
        return "whole-tuned", (f"ships the 100%-tuned compile: {wt['latency_s'] * 1e3:.3g} ms against "
                               f"{st['latency_s'] * 1e3:.3g} ms share-tuned in run {st['run']}")
    return "share-tuned", ""


def _latencies(runs, exported: dict[str, dict]) -> list[dict]:
    """The newest end-to-end latency of each (variant, neighbour) measured at this share. A
    variant whose compile could be exported (``exported``: its task configs, workload key ->
    mod_hash) says whether the run timed those configs (``same_configs``): tuning may have found
    better ones since."""
    newest: dict[tuple, object] = {}
    for r in runs:  # in the order written: the last one wins
        newest[(r.variant, (r.detail or {}).get("interference", "none"))] = r
    out = []
    for (variant, neighbour), r in sorted(newest.items()):
        row = {"variant": variant, "interference": neighbour, "latency_s": r.latency_s, "status": r.status,
               "run": r.run, "created_at": r.created_at}
        if variant in exported:
            ran = {k: t.get("mod_hash") for k, t in (r.detail or {}).get("tasks", {}).items() if t.get("mod_hash")}
            row["same_configs"] = ran == {k: h for k, h in exported[variant].items() if h}
        out.append(row)
    return out
