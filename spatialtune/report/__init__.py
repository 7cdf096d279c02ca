"""Reports: what tuning for a share buys, computed from the database into plain dataclasses
(:mod:`.data`), then rendered (:mod:`.render`)."""

from __future__ import annotations

from pathlib import Path


def write_report(db, out: Path) -> list[Path]:
    """Compute and render the report of ``db`` (a TuningDatabase) into ``out``; returns the files."""
    from .data import compute_report
    from .render import render

    return render(compute_report(db), Path(out))
