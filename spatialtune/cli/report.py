"""Commands for readers: ``report`` (the whole database) and ``compare`` (one workload)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from .common import db_arg, open_db


def add_report(sub) -> None:
    p = sub.add_parser("report", help="write report.md, report.html and plots of a tuning database")
    db_arg(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="output directory (created)")
    g.add_argument("--json", action="store_true", help="print the report's numbers as one JSON document")
    p.set_defaults(func=_cmd_report)
    c = sub.add_parser("compare", help="what single-tenant tuning costs one workload, share by share and neighbour "
                                       "by neighbour")
    db_arg(c)
    c.add_argument("--workload", required=True, help="workload name or key")
    c.add_argument("--json", action="store_true", help="one JSON array of the cells instead of a table")
    c.set_defaults(func=_cmd_compare)


def _cmd_report(a) -> int:
    from ..report import write_report

    with open_db(a.db, create=False) as db:
        if a.json:
            from ..report.data import compute_report, report_json

            print(json.dumps(report_json(compute_report(db)), indent=1, default=str))
            return 0
        paths = write_report(db, Path(a.out))
    for p in paths:
        print(p)
    return 0


def _cmd_compare(a) -> int:
    from ..report.tenancy import deployment_cells, format_cells

    with open_db(a.db, create=False) as db:
        keys = db.find_workload(a.workload)
        if not keys:
            raise ConfigError(f"no workload {a.workload!r} in {db.path}")
        if len(keys) > 1:
            raise ConfigError(f"{a.workload!r} names several workloads ({', '.join(keys)}): pass a key")
        t = deployment_cells(db, keys[0])
    if not t.cells:
        raise ConfigError(f"{keys[0]} has no tuned config in {a.db or 'the database'}")
    print(json.dumps([c.to_dict() for c in t.cells], indent=1) if a.json else format_cells(t))
    return 0
