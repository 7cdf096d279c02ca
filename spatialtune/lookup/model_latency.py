"""The question a scheduler asks before it grants a share (as KRISP's does): the smallest share
whose measured end-to-end latency meets the tenant's target.

Answers come from ``model_runs`` (``spatialtune model``: the whole model compiled with each
task's best config at that share, timed under the share), either straight from the database
(:func:`share_for_latency`) or as recorded in an export's manifest (``ModelLookup.share_for_latency``).
Per share the latency is that of the compile a scheduler would be handed there: the share-tuned
one, unless the same run timed the 100 %-tuned compile faster by more than ``store.exports.NOISE``
(the rule ``spatialtune model export`` ships by), and the answer says which (``compiled``). A row's
neighbour is ``detail["interference"]`` (``none`` when absent: the run had the rest of the
machine idle). A latency measured with no neighbour is not evidence for a share that will have
one, so a question about a neighbour is answered only from runs under that neighbour, or missed
with the reason.

Reads the database read-only with the standard library: no TVM, no sqlite-utils.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError, DatabaseError
from ..store.exports import whole_outran
from ..store.schema import SCHEMA_VERSION


@dataclass(frozen=True)
class LatencyAnswer:
    model: str
    target_s: float
    interference: str
    found: bool
    ratio: float | None = None  # the smallest share that meets the target
    granted_units: int | None = None
    latency_s: float | None = None  # its measured latency
    run: str | None = None
    reason: str = ""
    measured: tuple[dict, ...] = field(default=())  # every share considered: ratio, units, latency, status
    compiled: str | None = None  # whose configs the answer's latency is of: share-tuned, or whole-tuned

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def smallest_share(model: str, rows: Sequence[dict], latency_ms: float, interference: str = "none") -> LatencyAnswer:
    """The smallest share among ``rows`` (dicts with ratio, granted_units, latency_s, status,
    interference, run; the newest row of a share counts, rows in the order written) whose
    latency is at most ``latency_ms``."""
    if isinstance(latency_ms, bool) or not isinstance(latency_ms, (int, float)) or not latency_ms > 0:
        raise ConfigError(f"latency target must be a positive number of milliseconds, got {latency_ms!r}")
    target = latency_ms / 1e3
    newest: dict[float, dict] = {}
    others: set[str] = set()
    for r in rows:
        neighbour = r.get("interference") or "none"
        if neighbour == interference:
            newest[float(r["ratio"])] = r
        else:
            others.add(neighbour)
    measured = tuple({"ratio": ratio, "granted_units": r.get("granted_units"), "latency_s": r.get("latency_s"),
                      "status": r.get("status"), "compiled": r.get("variant", "share-tuned")}
                     for ratio, r in sorted(newest.items()))
    base = dict(model=model, target_s=target, interference=interference, measured=measured)
    if not newest:
        known = f" (measured under: {', '.join(sorted(others))})" if others else ""
        return LatencyAnswer(**base, found=False, reason=f"no share-tuned run of {model} under interference "
                                                         f"{interference!r}{known}")
    ok = [m for m in measured if m["status"] == "ok" and m["latency_s"]]
    meets = [m for m in ok if m["latency_s"] <= target]
    if not meets:
        if not ok:
            return LatencyAnswer(**base, found=False, reason="no share-tuned run of it succeeded")
        best = min(ok, key=lambda m: m["latency_s"])
        return LatencyAnswer(**base, found=False, reason=f"no share meets {latency_ms:g} ms: the fastest is "
                                                         f"{best['latency_s'] * 1e3:.3f} ms at {best['ratio']:g}%")
    m = meets[0]  # ascending by ratio
    return LatencyAnswer(**base, found=True, ratio=m["ratio"], granted_units=m["granted_units"],
                         latency_s=m["latency_s"], run=newest[m["ratio"]].get("run"), compiled=m["compiled"],
                         reason=f"the smallest of {len(meets)} measured share(s) meeting {latency_ms:g} ms")


def share_for_latency(db_path: str | Path, model: str, latency_ms: float, *, interference: str = "none",
                      device: str | None = None, partition: str | None = None) -> LatencyAnswer:
    """:func:`smallest_share` over the database's ``model_runs`` of ``model`` (a name, or a model
    hash), each share's latency that of the compile it would ship (:func:`shipped`). ConfigError
    for an unknown model, or several devices/partitions/model files when none is chosen."""
    rows = _read_runs(Path(db_path), model)
    if not rows:
        raise ConfigError(f"no model {model!r} in {db_path} (models: {', '.join(_models(Path(db_path))) or 'none'})")
    for col, want in (("device_id", device), ("partition", partition), ("model_hash", None)):
        if want is not None:
            rows = [r for r in rows if r[col] == want]
            if not rows:
                raise ConfigError(f"no run of {model!r} with {col} {want!r} in {db_path}")
        values = sorted({r[col] for r in rows})
        if len(values) > 1:
            flag = {"device_id": "--device", "partition": "--partition", "model_hash": "the model's hash as --model"}
            raise ConfigError(f"{model!r} was run with several {col}s ({', '.join(values)}): choose one with "
                              f"{flag[col]}")
    return smallest_share(rows[0]["model"], shipped(rows), latency_ms, interference)


def shipped(rows: Sequence[dict]) -> list[dict]:
    """The share-tuned rows of ``rows`` (in the order written), each replaced by the 100 %-tuned
    row of the same run, share and neighbour where that one ran faster by more than
    ``store.exports.NOISE``, both ``ok`` (:func:`~spatialtune.store.exports.whole_outran`)."""
    whole = {(r["run"], r["ratio"], r["interference"]): r for r in rows if r.get("variant") == "whole-tuned"}
    out = []
    for r in rows:
        if r.get("variant", "share-tuned") != "share-tuned":
            continue
        w = whole.get((r["run"], r["ratio"], r["interference"]))
        if w is not None and r["run"] and whole_outran(r, w):
            r = dict(w, granted_units=r["granted_units"])
        out.append(r)
    return out


def _connect(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise DatabaseError(f"{path}: no such database")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as e:
        raise DatabaseError(f"{path}: not a spatialtune database ({e})") from None
    if not row or int(row[0]) != SCHEMA_VERSION:
        conn.close()
        raise DatabaseError(f"{path}: schema v{row[0] if row else 0}, this spatialtune reads v{SCHEMA_VERSION}: "
                            "open it once with `spatialtune show --db` to upgrade it")
    return conn


def _read_runs(path: Path, model: str) -> list[dict]:
    conn = _connect(path)
    try:
        cur = conn.execute("SELECT model, model_hash, device_id, partition, ratio, granted_units, latency_s, status,"
                           " run, variant, detail FROM model_runs WHERE (model = ? OR model_hash = ?) AND variant IN "
                           "('share-tuned', 'whole-tuned') ORDER BY id", [model, model])
        cols = [c[0] for c in cur.description]
        rows = [dict(zip(cols, r)) for r in cur.fetchall()]
    finally:
        conn.close()
    for r in rows:
        r["interference"] = (json.loads(r.pop("detail") or "{}") or {}).get("interference", "none")
    return rows


def _models(path: Path) -> list[str]:
    conn = _connect(path)
    try:
        return [m for (m,) in conn.execute("SELECT DISTINCT model FROM model_runs ORDER BY model")]
    finally:
        conn.close()
