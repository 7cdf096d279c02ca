"""Where the default database lives.

In a checkout (a ``tuning_db/`` directory beside the package): ``tuning_db/spatialtune.sqlite``,
the embedded default. Installed elsewhere: a per-user data directory
(``$XDG_DATA_HOME/spatialtune/spatialtune.sqlite``, else ``~/.local/share/...``).
``$SPATIALTUNE_DB`` overrides both.
"""

from __future__ import annotations

import os
from pathlib import Path

DB_NAME = "spatialtune.sqlite"


def checkout_root() -> Path | None:
    """The repository root when running from a checkout, else None."""
    root = Path(__file__).resolve().parent.parent.parent
    return root if (root / "tuning_db").is_dir() and (root / "pyproject.toml").is_file() else None


def user_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "spatialtune"


def default_db_path() -> Path:
    env = os.environ.get("SPATIALTUNE_DB")
    if env:
        return Path(env)
    root = checkout_root()
    return (root / "tuning_db" if root else user_data_dir()) / DB_NAME


def artifact_dir(db_path: Path) -> Path:
    """Build artifacts of the jobs writing ``db_path`` (kernels are rebuilt from traces on demand,
    so this directory can be pruned at any time: ``spatialtune db vacuum``)."""
    return Path(db_path).resolve().parent / "artifacts"


def prune_artifacts(db_path: Path) -> tuple[int, int]:
    """Delete the build artifacts of the jobs writing ``db_path``; returns (files, bytes) removed.
    Nothing is lost: every kernel is rebuilt from its stored trace when needed."""
    import shutil

    d = artifact_dir(db_path)
    if not d.is_dir():
        return 0, 0
    files = [f for f in d.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    shutil.rmtree(d)
    return len(files), size
