"""The files a bundle round passes between hosts: ``manifest.json`` and ``results.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ConfigError
from ..terms import Condition
from . import FORMAT


def load_manifest(bundle: str) -> dict:
    p = Path(bundle) / "manifest.json"
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{bundle}: not a bundle (no manifest.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not a bundle manifest ({e})") from None
    if m.get("format") != FORMAT:
        raise ConfigError(f"{p}: bundle format {m.get('format')!r}, expected {FORMAT}")
    return m


def load_results(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no results.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not a results file ({e})") from None


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` so that a reader sees the old file or the new one, never half of one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def conditions_for(candidate: dict) -> set[Condition]:
    """The conditions a manifest's candidate was proposed for (its ``for``, each written by
    ``Condition.to_json``): the run measures it under every one of them."""
    return {Condition.from_json(c) for c in candidate.get("for", [])}
