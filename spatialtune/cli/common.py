"""What every command group shares: the one-line error parser, the database options."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise SystemExit(fail(f"{self.prog}: {message}"))


def fail(msg: str) -> int:
    print(f"spatialtune: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def db_arg(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    p.add_argument("--db", required=required, help="tuning database (default: tuning_db/spatialtune.sqlite, "
                   "or $SPATIALTUNE_DB)")


def open_db(path: str | None, *, create: bool):
    from ..store.database import TuningDatabase
    from ..store.paths import default_db_path

    if path:
        return TuningDatabase(Path(path), create=create)
    default = default_db_path()
    if create:
        default.parent.mkdir(parents=True, exist_ok=True)
    return TuningDatabase(default, create=create)
