"""``spatialtune db``: MetaSchedule export and import, merging databases."""

from __future__ import annotations

import json
from pathlib import Path

from .common import Parser, db_arg, open_db


def add_db(sub) -> None:
    p = sub.add_parser("db", help="database interop: MetaSchedule export/import, merge")
    dsub = p.add_subparsers(dest="db_command", metavar="DBCOMMAND", parser_class=Parser, required=True)
    e = dsub.add_parser("export-metaschedule", help="write a MetaSchedule JSON database of one share's best configs")
    db_arg(e)
    e.add_argument("--ratio", type=float, required=True)
    e.add_argument("--out", required=True, help="directory for database_workload.json, database_tuning_record.json")
    e.add_argument("--interference", default="none")
    e.add_argument("--device", default=None)
    e.add_argument("--partition", default=None)
    e.set_defaults(func=_cmd_db_export)
    i = dsub.add_parser("import-metaschedule", help="take a MetaSchedule JSON database as measured records")
    i.add_argument("dir", help="directory holding database_workload.json and database_tuning_record.json")
    db_arg(i)
    i.add_argument("--ratio", type=float, required=True, help="the share those records were measured under")
    i.add_argument("--interference", default="none")
    i.add_argument("--device", default=None, help="device id in the database (default: this machine)")
    i.add_argument("--partition", default=None)
    i.add_argument("--space", default=None, help="search-space file naming the workloads to match")
    i.set_defaults(func=_cmd_db_import)
    v = dsub.add_parser("vacuum", help="compact the database and delete its build artifacts (rebuilt on demand)")
    db_arg(v)
    v.add_argument("--keep-artifacts", action="store_true", help="compact the database only")
    v.set_defaults(func=_cmd_db_vacuum)
    m = dsub.add_parser("merge", help="merge databases from several tuning hosts into a new one")
    m.add_argument("sources", nargs="+", metavar="DB")
    m.add_argument("--out", required=True)
    m.set_defaults(func=_cmd_db_merge)


def _cmd_db_export(a) -> int:
    from ..lookup.metaschedule import export_metaschedule

    with open_db(a.db, create=False) as db:
        s = export_metaschedule(db, a.ratio, Path(a.out), interference=a.interference, device_id=a.device,
                                partition=a.partition)
    print(json.dumps(s.to_dict()))
    return 0


def _cmd_db_import(a) -> int:
    from ..store.metaschedule import import_metaschedule

    workloads = None
    if a.space:
        from ..workloads.spec import load_space

        workloads = load_space(a.space).workloads
    with open_db(a.db, create=True) as db:
        s = import_metaschedule(db, Path(a.dir), a.ratio, interference=a.interference, device_id=a.device,
                                partition=a.partition, workloads=workloads)
    print(json.dumps(s.to_dict()))
    return 0


def _cmd_db_merge(a) -> int:
    from ..store.merge import merge_databases

    s = merge_databases([Path(x) for x in a.sources], Path(a.out))
    print(json.dumps(s.to_dict()))
    return 0


def _cmd_db_vacuum(a) -> int:
    from ..store.paths import prune_artifacts

    with open_db(a.db, create=False) as db:
        before, after = db.vacuum()
        path = db.path
    files, freed = (0, 0) if a.keep_artifacts else prune_artifacts(path)
    print(f"{path}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB; {files} build artifacts deleted "
          f"({freed / 1e6:.1f} MB)")
    return 0
