"""``spatialtune model export``: a compiled model per share and its manifest, for schedulers;
``spatialtune lookup --model``: which of them (or which share) a scheduler should grant.

``spatialtune model`` takes the ONNX file as its first argument, so ``export`` cannot be one of
its argparse subcommands without breaking ``spatialtune model MODEL.onnx``: the export is its
own command, ``model-export``, and :func:`route` spells ``model export`` that way before parsing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import ConfigError
from .common import db_arg, open_db


def route(argv: list[str]) -> list[str]:
    """``[global options] model export ...`` -> ``[global options] model-export ...``."""
    i = next((k for k, a in enumerate(argv) if not a.startswith("-")), None)
    if i is not None and argv[i:i + 2] == ["model", "export"]:
        return [*argv[:i], "model-export", *argv[i + 2:]]
    return argv


def add_model_export(sub) -> None:
    p = sub.add_parser("model-export", help="(also: model export) compile an ONNX model once per share with that "
                                            "share's kernels, for schedulers: libraries and a manifest")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--ratios", required=True, help="shares to compile for, percent, e.g. 25,50,100")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the libraries and manifest.json")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=D1,D2,...",
                   help="static shape of a model input (as given to workloads --from-onnx)")
    p.add_argument("--interference", default="none",
                   help="use the configs tuned under this condition (none, cold, ...)")
    p.add_argument("--mcpu", default=None, help="the LLVM CPU the tuning records were measured for")
    p.add_argument("--layout", default="auto",
                   help="convolutions in this layout: auto (default: blocked by this CPU's fp32 vector width when every "
                        "convolution takes it, large 3x3 ones as Winograd), nchw, NCHW<b>c or NCHW<b>c+winograd; "
                        "as the tasks were extracted (docs/models.md)")
    p.add_argument("--json", action="store_true", help="print the manifest instead of a summary")
    db_arg(p)
    p.set_defaults(func=_cmd_export)


def _cmd_export(a) -> int:
    from ..models.export import MANIFEST, ExportOptions, export_model
    from ..models.importer import parse_shapes
    from ..terms import parse_ratios

    ratios = parse_ratios(a.ratios)
    shapes = parse_shapes(a.shape)
    with open_db(a.db, create=False) as db:
        m = export_model(a.model, ratios, db, a.out, ExportOptions(shapes=shapes, layout=a.layout, mcpu=a.mcpu,
                                                                   interference=a.interference),
                         progress=None if a.json else (lambda s: print(s, file=sys.stderr)))
    if a.json:
        print(json.dumps(m, indent=1))
        return 0
    dev = m["device"]
    print(f"{m['model']['name']} ({m['model']['hash']}) for {dev['name']} ({dev['id']}), partition {m['partition']}:")
    for v in m["variants"]:
        lat = next((x for x in v["latencies"] if x["variant"] == v["compiled"] and x["interference"] == "none"), None)
        measured = f", measured {lat['latency_s'] * 1e3:.3f} ms" if lat and lat["latency_s"] else ""
        whose = "" if v["compiled"] == "share-tuned" else " (the 100%-tuned configs: faster at this share)"
        print(f"  {v['ratio']:g}% ({v['granted_units']} cores, {v['threads']} threads): {v['file']}, "
              f"{v['tuned_tasks']}/{v['n_tasks']} tasks tuned{whose}{measured}")
    print(Path(a.out) / MANIFEST)
    return 0


def add_model_lookup_args(p) -> None:
    """The ``lookup`` options of a model question (``--model`` instead of ``--workload``)."""
    p.add_argument("--model", default=None, help="a model run by `spatialtune model` (name or hash), or an "
                                                 "export directory: answer for the whole model")
    p.add_argument("--latency-ms", type=float, default=None,
                   help="with --model: the smallest share whose measured latency meets this target")


def cmd_model_lookup(a) -> int:
    """``lookup --model NAME --latency-ms X`` answers from the database's model runs;
    ``lookup --model DIR --units N`` (or ``--ratio``) picks a variant of an export, and with
    ``--latency-ms`` answers from the latencies its manifest recorded."""
    from ..lookup import ModelLookup, share_for_latency
    from ..store.paths import default_db_path

    if a.workload:
        raise ConfigError("give --workload (a kernel) or --model (a whole model), not both")
    is_dir = Path(a.model).is_dir()
    if a.latency_ms is None and not (is_dir and (a.ratio is not None or a.units is not None)):
        raise ConfigError("--model needs --latency-ms (or, with an export directory, --units or --ratio)")
    if is_dir:
        ml = ModelLookup(a.model, device=a.device, any_device=a.any_device)
        if a.latency_ms is not None:
            out = ml.share_for_latency(a.latency_ms, a.interference).to_dict()
        else:
            out = ml.lookup(units=a.units, ratio=a.ratio).to_dict()
    else:
        out = share_for_latency(Path(a.db) if a.db else default_db_path(), a.model, a.latency_ms,
                                interference=a.interference, device=a.device, partition=a.partition).to_dict()
    print(json.dumps(out, indent=2))
    return 0
