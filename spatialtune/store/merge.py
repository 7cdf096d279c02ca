"""Merging the databases of several tuning hosts into a new one.

:func:`merge_databases` writes a new database holding every source's devices, workloads,
measurements (dates kept) and baselines; a kernel measured under the same tuning key on several
hosts is kept once (the first source's measurement stands) and ``best`` is recomputed. Sources
are opened read-only and never modified.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError, DatabaseError
from .database import TuningDatabase
from .schema import SCHEMA_VERSION

log = logging.getLogger(__name__)


@dataclass
class MergeSummary:
    out: str
    sources: list[str]
    devices: int = 0
    workloads: int = 0
    measurements: int = 0
    duplicates: int = 0
    baselines: int = 0
    best: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def merge_databases(sources: Sequence[Path], out: Path) -> MergeSummary:
    """Merge ``sources`` into a new database at ``out`` (which must not exist).

    Written to a temporary file next to ``out`` and renamed when complete, so ``out`` is either
    absent or whole. Raises DatabaseError when a source is missing or two sources disagree on a
    workload's spec.
    """
    from ..device import DeviceInfo

    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out}: already exists; merge writes a new database")
    srcs = [Path(s) for s in sources]
    for s in srcs:
        if not s.is_file():
            raise DatabaseError(f"{s}: no such database")
        if s.resolve() == out.resolve():
            raise ConfigError(f"{out}: is also a source")
    summary = MergeSummary(str(out), [str(s) for s in srcs])
    fd, tmpname = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else ".")
    os.close(fd)
    os.unlink(tmpname)
    tmp = Path(tmpname)
    try:
        with TuningDatabase(tmp, create=True) as dst:
            for s in srcs:
                with _open_readonly(s) as src:
                    for d in src.devices():
                        dst.add_device(DeviceInfo.from_dict(d))
                    for w in src.workloads():
                        dst.add_workload(w)
                    for m in src.measurements(with_features=True):
                        m.id = None
                        if dst.record(m) is None:
                            summary.duplicates += 1
                        else:
                            summary.measurements += 1
                    for b in src.baselines():
                        summary.baselines += dst.add_baseline_row(b)
            summary.devices = len(dst.devices())
            summary.workloads = len(dst.workloads())
            summary.best = len(dst.best_index_rows())
        os.replace(tmp, out)
    finally:
        for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            if p.exists():
                p.unlink()
    log.info("merged %d databases into %s: %d measurements, %d duplicates", len(srcs), out, summary.measurements,
             summary.duplicates)
    return summary


class _open_readonly:
    """A TuningDatabase over a read-only connection, so merging can never write a source."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> TuningDatabase:
        import sqlite_utils

        db = TuningDatabase.__new__(TuningDatabase)
        db.path = self.path
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                   check_same_thread=False)
            db.db = sqlite_utils.Database(conn)
            version = db.schema_version
        except sqlite3.DatabaseError as e:
            raise DatabaseError(f"{self.path}: not a spatialtune database ({e})") from None
        if version != SCHEMA_VERSION:
            raise DatabaseError(f"{self.path}: schema v{version}, this spatialtune writes v{SCHEMA_VERSION}: "
                                "open it once with spatialtune to upgrade it, then merge")
        self.db = db
        return db

    def __exit__(self, *exc) -> None:
        self.db.close()
