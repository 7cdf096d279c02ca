"""``spatialtune bundle models``: add whole models, compiled per share, to a bundle.

This layer joins the two packages that may not import each other: :mod:`spatialtune.models`
compiles each model per share of the bundle's device from the tuning database
(:mod:`spatialtune.models.share_export`), and the bundle's manifest gets a ``models`` section that
``bundle run`` measures on the device (:mod:`spatialtune.bundle.models`).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from ..errors import ConfigError
from .common import open_db


def add_bundle_models(bs) -> None:
    m = bs.add_parser("models", help="compile ONNX models per share of the bundle's device into it, run end to end "
                      "by bundle run")
    m.add_argument("bundle", help="bundle directory (from bundle build)")
    m.add_argument("models", nargs="+", metavar="MODEL.onnx")
    m.add_argument("--db", default=None, help="tuning database with the records of the models' tasks (default: the "
                   "database the bundle's round continued from, if any; without one every task gets the default)")
    m.add_argument("--device", default=None, metavar="ID", help="the device of --db (default: the round's)")
    m.add_argument("--shape", action="append", default=[], metavar="NAME=D1,D2,...",
                   help="static shape of a model input (as given to workloads --from-onnx)")
    m.add_argument("--layout", default="nchw", help="convolutions in this layout, as the tasks were extracted "
                   "(nchw, NCHW<b>c, NCHW<b>c+winograd or auto)")
    m.add_argument("--seed", type=int, default=0, help="the random inputs and the drawn weights")
    m.add_argument("--params-from", type=int, default=4096, metavar="N",
                   help="weights of at least N elements are drawn from the seed on each host instead of carried")
    m.set_defaults(func=_cmd_bundle_models)


def _cmd_bundle_models(a) -> int:
    from ..bundle.manifest import load_manifest, write_json
    from ..models.importer import parse_shapes
    from ..models.share_export import BundleModelOptions, export_bundle_model

    if a.params_from < 1:
        raise ConfigError(f"--params-from must be positive, got {a.params_from}")
    for p in a.models:
        if not Path(p).is_file():
            raise ConfigError(f"{p}: no such ONNX file")
    man = load_manifest(a.bundle)
    opts = BundleModelOptions(shapes=parse_shapes(a.shape), layout=a.layout, seed=a.seed, params_from=a.params_from)
    kind = "cpu" if man["target"].get("kind") == "llvm" else "cuda"
    round_ = man.get("round") or {}
    db_path = a.db or (round_.get("db") if round_.get("db") not in (None, "None") else None)
    with (open_db(db_path, create=False) if db_path else contextlib.nullcontext()) as db:
        device = _device(db, a.device or round_.get("device_id"), kind, man["arch"])
        entries = [export_bundle_model(p, db, device, Path(a.bundle), ["cpu"] if kind == "cpu" else ["mps", "green"],
                                       opts, progress=lambda s: print(s, file=sys.stderr)) for p in a.models]
    names = {e["name"] for e in entries}
    man["models"] = [e for e in man.get("models", []) if e["name"] not in names] + entries
    write_json(Path(a.bundle) / "manifest.json", man)
    for e in entries:
        files = {v["file"] for v in e["variants"]}
        size = sum((Path(a.bundle) / f).stat().st_size for f in files) / 2**20
        print(f"model {e['name']}: {len(e['variants'])} variants in {len(files)} libraries ({size:.1f} MiB), "
              f"{len(e['params'])} weights drawn from seed {e['seed']}, {e['n_tasks']} tasks")
        for v in e["variants"]:
            print(f"  {v['id']}: {v['tuned_tasks']}/{e['n_tasks']} tasks tuned"
                  + (f" (same kernels as {v['same_as']})" if v.get("same_as") else ""))
    return 0


def _device(db, device_id: str | None, kind: str, arch: str):
    """The device whose records are used: the database's (by id, else its only one of the kind),
    or with no database the bundle's own (this CPU, or a GPU known only by its arch)."""
    from ..bundle.pack import bundle_device, pick_device
    from ..device import DeviceInfo

    if db is None:
        return bundle_device(kind, arch if kind == "cuda" else None, None)
    d = pick_device(db, device_id, kind)
    if kind == "cuda" and d.get("arch") and d["arch"] != arch:
        raise ConfigError(f"device {d['id']} is {d['arch']}, the bundle is {arch}")
    return DeviceInfo.from_dict(d)
