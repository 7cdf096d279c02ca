"""The command for schedulers: ``lookup`` (kernels, and with ``--model`` whole models)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from .common import db_arg
from .model_export import add_model_lookup_args, cmd_model_lookup


def add_lookup(sub) -> None:
    p = sub.add_parser("lookup", help="the config a scheduler should use for a granted share (JSON)")
    db_arg(p)
    p.add_argument("--workload", help="workload name or key")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ratio", type=float, help="granted share, percent of the device")
    g.add_argument("--units", type=int, help="granted cores or SMs")
    p.add_argument("--interference", default="none")
    p.add_argument("--device", default=None, help="device id (default: this machine's)")
    p.add_argument("--any-device", action="store_true",
                   help="answer from a database (or a model export) of another device than this machine's (the answer "
                        "says so)")
    p.add_argument("--include-unchecked", action="store_true",
                   help="also serve imported configs never run through the output check (marked checked: false)")
    p.add_argument("--partition", default=None, help="cpu, mps or green (needed when several were tuned)")
    p.add_argument("--trace", action="store_true", help="include the stored trace")
    add_model_lookup_args(p)
    p.set_defaults(func=_cmd_lookup)


def _cmd_lookup(a) -> int:
    from ..lookup import Lookup

    if a.model:
        return cmd_model_lookup(a)
    if not a.workload or (a.ratio is None and a.units is None):
        raise ConfigError("lookup needs --workload and one of --ratio or --units (or --model, see --help)")
    path = Path(a.db) if a.db else None
    if path is None:
        from ..store.paths import default_db_path

        path = default_db_path()
    if not path.is_file():
        raise ConfigError(f"{path}: no such database")
    with Lookup(path, check_interval_s=None, any_device=a.any_device, include_unchecked=a.include_unchecked,
                here=[a.device] if a.device else None) as lk:
        r = lk.lookup(a.workload, ratio=a.ratio, units=a.units, interference=a.interference, device=a.device,
                      partition=a.partition)
        out = r.to_dict()
        if a.trace:
            out["trace"] = lk.trace(r)
    print(json.dumps(out, indent=2))
    return 0
