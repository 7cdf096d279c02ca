"""A model per share for a GPU bundle (CPU host): compiled here, run end to end on the GPU host.

For every share the database has records for (a task's measurements on the bundle's device,
without a neighbour), and for the whole device of each partition, the model is compiled with each
task's best kernel at that share (:func:`.compile.records_for`: the fastest measured there,
falling back to the whole device's; a task with no record on the device gets TVM's default GPU
schedule, or on a CPU its untuned build). Variants that pick the same kernel for every task are
one library. Each library is a Relax VM executable exported with cubins embedded
(:mod:`spatialtune.cuda.embed`), which a runtime-only TVM loads without compiling anything.

Nothing here knows a particular model. To keep the carry small, weights of at least
``params_from`` elements are inputs of the compiled model, not constants in each library
(:func:`.importer.lift_params`), and the bundle does not carry them: the manifest records each
one's shape, mean and spread, and both hosts draw it from the seed
(:mod:`spatialtune.measure.model_inputs`); the latency does not depend on the values. The
reference outputs are ONNX Runtime's (CPU) on the same drawn inputs and weights, every output
sampled down to at most ``reference_elements`` values. ONNX Runtime on the GPU host runs a
skeleton of the model, the same graph with the drawn weights handed in as its initializers.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..device import DeviceInfo, target_for
from ..errors import ConfigError
from ..measure.model_inputs import drawn_weights, random_inputs, sample, weight_spec
from ..terms import norm_ratio
from .compile import compile_model, records_for
from .importer import extract_workloads, load_onnx
from .layout import WINOGRAD

log = logging.getLogger(__name__)

SKELETON_LOCATION = "weights-drawn-from-the-seed"  # an external-data location no host has


@dataclass(frozen=True)
class BundleModelOptions:
    shapes: dict | None = None  # static input shapes, as given to workloads --from-onnx
    layout: str = "nchw"  # of the convolutions, as the model's tasks were extracted (models.layout)
    seed: int = 0  # the inputs and the drawn weights
    params_from: int = 4096  # weights of at least this many elements are drawn from the seed, not carried
    reference_elements: int = 1 << 18  # at most this many reference values per output


def export_bundle_model(path: str | Path, db, device: DeviceInfo, bundle: Path, partitions: list[str],
                        options: BundleModelOptions = BundleModelOptions(),
                        progress: Callable[[str], None] | None = None) -> dict:
    """Compile the ONNX model at ``path`` per share of ``device`` into ``bundle``/models/NAME
    (``db``: the tuning database, or None for no records); returns its manifest entry."""
    say = progress or (lambda s: None)
    plain = load_onnx(path, options.shapes, options.layout)
    if device.kind != "cpu" and plain.layout.endswith(WINOGRAD):
        raise ConfigError(f"--layout {options.layout}: {plain.name}'s Winograd transforms are CPU kernels "
                          "(parallel loops, no GPU threads); give a layout without them (nchw or NCHW<b>c)")
    model = load_onnx(path, options.shapes, options.layout, params_from=options.params_from)
    tasks = extract_workloads(plain, fast_math=device.kind == "cpu")
    out = bundle / "models" / model.name
    out.mkdir(parents=True, exist_ok=True)
    params = [weight_spec(n, v.numpy()) for n, v in model.params]
    entry = {"name": model.name, "hash": model.hash, "layout": model.layout, "seed": options.seed,
             "inputs": [{"name": n, "shape": list(s), "dtype": dt} for n, s, dt in model.inputs],
             "outputs": model.outputs, "params": params, "n_tasks": len(tasks),
             "tasks": [{"key": w.key, "name": w.name, "weight": w.weight} for w in tasks]}
    entry |= _references(plain.path, entry, out, bundle, options)
    build = _Build(model, tasks, db, device, out, bundle)
    entry["variants"] = []
    for part, ratio in _shares(db, tasks, device, partitions):
        t0 = time.perf_counter()
        v = build.variant(part, ratio)
        entry["variants"].append(v)
        say(f"{model.name} {part}:{ratio:g}%: {v['tuned_tasks']} of {len(tasks)} tasks tuned"
            + (f", the same kernels as {v['same_as']}" if v.get("same_as") else f", {time.perf_counter() - t0:.1f} s"))
    return entry


def _shares(db, tasks, device: DeviceInfo, partitions: list[str]) -> list[tuple[str, float]]:
    """The whole device of each partition, then every share with a task's record on the device."""
    found: set[tuple[str, float]] = set()
    if db is not None and device.id:
        for w in tasks:
            found |= {(m.partition, norm_ratio(m.ratio)) for m in db.measurements(
                workload_key=w.key, device_id=device.id, interference="none", status="ok")}
    parts = list(dict.fromkeys([*partitions, *sorted(p for p, _ in found)]))
    return [(p, 100.0) for p in parts] + sorted((k for k in found if k[1] != 100.0), key=lambda k: (k[0], -k[1]))


@dataclass
class _Build:
    """What the variants of one model share: the model, its tasks, where records come from, where
    libraries go, and the libraries compiled so far by their kernels."""

    model: object
    tasks: list
    db: object
    device: DeviceInfo
    out: Path
    bundle: Path
    libs: dict = field(default_factory=dict)  # (CPU cores, each task's kernel) -> (variant compiled, tuned)

    def variant(self, part: str, ratio: float) -> dict:
        """One share's library (or the one it shares kernels with) and per task which schedule it got."""
        device, tasks, name = self.device, self.tasks, self.model.name
        units = _units(device, part, ratio)
        if self.db is not None and device.id:
            msdb, facts = records_for(self.db, tasks, device, part, ratio, "none",
                                      fallback_ratio=None if ratio == 100.0 else 100.0)
        else:
            msdb, facts = None, {}
        # the same kernel for every task is the same library (on a CPU also the same cores: the
        # thread pool is compiled in); each variant still says where its own records came from
        ident = (units if device.kind == "cpu" else None, tuple(facts.get(w.key, {}).get("mod_hash") for w in tasks))
        v = {"id": f"{name}/{part}:{ratio:g}%", "variant": "whole-tuned" if ratio == 100.0 else "share-tuned",
             "partition": part, "ratio": ratio, "units": units}
        if ident in self.libs:
            same, tuned = self.libs[ident]
            v |= {k: same[k] for k in ("file", "default_functions", "cuda")} | {"same_as": same["id"]}
        else:
            report: dict = {}
            file = self.out / f"{name}-{part}-{ratio:g}pct.so"
            target = target_for(device, units) if device.kind == "cpu" else target_for(device)
            compile_model(self.model, target, msdb, str(file), tasks if device.kind == "cpu" else (), report)
            tuned = set(report.get("tuned", ()))
            v |= {"file": os.path.relpath(file, self.bundle), "default_functions": len(report.get("default", ())),
                  "cuda": report.get("cuda", [])}
            self.libs[ident] = (v, tuned)
        v["tasks"] = _schedules(tasks, facts, tuned, part, ratio, device.kind)
        v["tuned_tasks"] = sum(t["mod_hash"] is not None for t in v["tasks"].values())
        return v


def _schedules(tasks, facts: dict, tuned: set[str], part: str, ratio: float, kind: str) -> dict:
    """Per task: the schedule it got in this variant (a record and the share it was tuned at, or
    the default), with the kernel's time there."""
    default = "default GPU schedule (dlight)" if kind == "cuda" else "untuned (TVM's default build)"
    out = {}
    for w in tasks:
        f = facts.get(w.key, {})
        row = {"name": w.name, "weight": w.weight, "schedule": default, "mod_hash": None, "time_s": None}
        if w.prim.hash in tuned and f.get("mod_hash"):
            at = f["tuned_ratio"]
            row |= {"schedule": f"tuned at {part}:{at:g}%" + (" (fallback)" if at != ratio else ""),
                    "mod_hash": f["mod_hash"], "time_s": f["time_s"]}
        out[w.key] = row
    return out


def _units(device: DeviceInfo, part: str, ratio: float) -> int:
    if device.kind == "cpu":
        from ..partitions import create_partition

        return create_partition("cpu").grant(ratio).units
    return max(1, round(device.units * ratio / 100.0))


def _references(onnx_path: str, entry: dict, out: Path, bundle: Path, opt: BundleModelOptions) -> dict:
    """ONNX Runtime's (CPU) outputs on the drawn inputs and weights, sampled; and the skeleton."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    proto = onnx.load(onnx_path)
    by_name = {i.name.removeprefix("onnx::"): i.name for i in proto.graph.initializer}
    drawn = dict(zip([p["name"] for p in entry["params"]], drawn_weights(entry["params"], opt.seed)))
    for p in entry["params"]:
        p["onnx"] = by_name[p["name"]]
    full, skeleton = onnx.ModelProto(), onnx.ModelProto()
    full.CopyFrom(proto)
    skeleton.CopyFrom(proto)
    onnx_names = {p["onnx"]: p["name"] for p in entry["params"]}
    for model, skel in ((full, False), (skeleton, True)):
        inits = list(model.graph.initializer)
        del model.graph.initializer[:]
        for t in inits:
            if t.name in onnx_names:
                t = numpy_helper.from_array(drawn[onnx_names[t.name]], t.name)
                if skel:
                    t = onnx.TensorProto(name=t.name, dims=t.dims, data_type=t.data_type,
                                         data_location=onnx.TensorProto.EXTERNAL)
                    loc = t.external_data.add()
                    loc.key, loc.value = "location", SKELETON_LOCATION
            model.graph.initializer.append(t)
    xs = random_inputs(entry["inputs"], opt.seed)
    sess = ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [np.asarray(o) for o in sess.run(None, dict(zip([i["name"] for i in entry["inputs"]], xs)))]
    strides = [max(1, math.ceil(o.size / opt.reference_elements)) for o in outs]
    np.savez_compressed(out / "reference.npz", **{f"o{i}": sample(o, s) for i, (o, s) in enumerate(zip(outs, strides))})
    (out / "skeleton.onnx").write_bytes(skeleton.SerializeToString())
    return {"reference": os.path.relpath(out / "reference.npz", bundle), "strides": strides,
            "reference_from": f"onnxruntime {ort.__version__} CPUExecutionProvider",
            "output_shapes": [list(o.shape) for o in outs],
            "skeleton": os.path.relpath(out / "skeleton.onnx", bundle)}
