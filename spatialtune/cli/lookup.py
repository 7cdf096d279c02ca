"""Commands for schedulers and readers: ``lookup``, ``report``."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from .common import db_arg, open_db


def add_lookup(sub) -> None:
    p = sub.add_parser("lookup", help="the config a scheduler should use for a granted share (JSON)")
    db_arg(p)
    p.add_argument("--workload", required=True, help="workload name or key")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ratio", type=float, help="granted share, percent of the device")
    g.add_argument("--units", type=int, help="granted cores or SMs")
    p.add_argument("--interference", default="none")
    p.add_argument("--device", default=None, help="device id (needed when the database holds several)")
    p.add_argument("--partition", default=None, help="cpu, mps or green (needed when several were tuned)")
    p.add_argument("--trace", action="store_true", help="include the stored trace")
    p.set_defaults(func=_cmd_lookup)


def _cmd_lookup(a) -> int:
    from ..lookup import Lookup

    path = Path(a.db) if a.db else None
    if path is None:
        from ..store.paths import default_db_path

        path = default_db_path()
    if not path.is_file():
        raise ConfigError(f"{path}: no such database")
    with Lookup(path, check_interval_s=None) as lk:
        r = lk.lookup(a.workload, ratio=a.ratio, units=a.units, interference=a.interference, device=a.device,
                      partition=a.partition)
        out = r.to_dict()
        if a.trace:
            out["trace"] = lk.trace(r)
    print(json.dumps(out, indent=2))
    return 0


def add_report(sub) -> None:
    p = sub.add_parser("report", help="write report.md, report.html and plots of a tuning database")
    db_arg(p)
    p.add_argument("--out", required=True, help="output directory (created)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(a) -> int:
    from ..report import write_report

    with open_db(a.db, create=False) as db:
        paths = write_report(db, Path(a.out))
    for p in paths:
        print(p)
    return 0
