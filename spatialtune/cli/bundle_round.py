"""``spatialtune bundle build``: a GPU round is ``tune`` with the bundle runner.

This layer only says which ``tune`` calls a round makes: one per (partition, neighbour) of the
shares asked for (by default every share measured on the device without a neighbour, or the
whole device in a first round), into one bundle. Which candidates, which cost model, the
transfers, the winners and the winners matrix are ``tune``'s, as when it measures here.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from ..errors import ConfigError

NO_BUDGET = 1_000_000_000  # a round without --trials: every share gets its batch
NEW = ("search", "explore", "local", "seed-tile")  # what the policy's search proposes


def build_round(a, per_wl: dict[str, int], explore: dict[str, int]) -> tuple[dict, dict]:
    """Tune the round's shares into the bundle at ``a.out``; returns the manifest and, per
    workload, how many measurements it started from and its candidates by role."""
    from ..bundle.pack import BundleRunner, bundle_device, pick_device
    from ..tuning import tune
    from ..workloads.spec import load_space

    workloads = load_space(a.space).select(a.workload)
    _check_names("--workload-candidates", per_wl, workloads)
    _check_names("--explore", explore, workloads)
    with tempfile.TemporaryDirectory(prefix="spatialtune-round-") as tmp, _round_db(a.db, tmp) as db:
        dev = pick_device(db, a.device, a.target) if a.db else None
        device = bundle_device(a.target, a.arch, dev)
        groups = _share_groups(a.share, db, device, workloads, a.target)
        origin = {"db": str(a.db), "device_id": device.id, "device": device.name} if a.db else None
        with BundleRunner(a.out, device, next(iter(groups))[0], space=a.space, seed=a.seed,
                          origin=origin) as runner:
            for gi, ((partition, interference), ratios) in enumerate(groups.items()):
                runner.partition = partition
                for n, ws in _by_count(workloads, a.candidates, per_wl).items():
                    tune(ws, ratios, db, _options(a, n, partition, interference, explore if gi == 0 else {}, tmp),
                         runner=runner)
        if not runner.manifest["candidates"]:
            raise ConfigError("nothing to measure in this round: every share has its --trials")
        return runner.manifest, _summary(db, device, runner.manifest)


def _options(a, batch: int, partition: str, interference: str, samples: dict[str, int], tmp: str):
    from ..tuning import TuneOptions

    return TuneOptions(trials=a.trials or NO_BUDGET, batch=batch, target=a.target, partition=partition,
                       interference=interference, cost_model=a.cost_model, transfer_top=a.transfer_top,
                       confirm_top=a.transfer_top, seed=a.seed, build_workers=a.build_workers, arch=a.arch,
                       samples=samples, baselines=False, artifact_dir=tmp)


@contextlib.contextmanager
def _round_db(path: str | None, tmp: str):
    """The database to continue from, or a scratch one for a first round (it records nothing
    but the device and the workloads: every measurement is pending)."""
    from ..store.database import TuningDatabase

    with TuningDatabase(Path(path) if path else Path(tmp) / "round.sqlite", create=not path) as db:
        yield db


def _share_groups(selectors, db, device, workloads, target: str) -> dict[tuple[str, str], list[float]]:
    """(partition, neighbour) -> the ratios to tune there."""
    from ..terms import parse_condition

    out: dict[tuple[str, str], list[float]] = {}
    if not selectors:
        keys = {(m.partition, m.ratio) for w in workloads
                for m in db.measurements(workload_key=w.key, device_id=device.id, interference="none")}
        if not keys and db.count_measurements(device_id=device.id):
            raise ConfigError(f"nothing measured on {device.id} without a neighbour to continue from "
                              f"(choose shares with --share)")
        for partition, ratio in sorted(keys) or [("cpu" if target == "cpu" else "mps", 100.0)]:
            out.setdefault((partition, "none"), []).append(ratio)
        return out
    for text in selectors:
        c = parse_condition(text)
        if (c.partition_kind == "cpu") != (target == "cpu"):
            raise ConfigError(f"--share {text}: a {target} bundle takes "
                              f"{'cpu:RATIO' if target == 'cpu' else 'mps:... or green:...'} shares")
        ratio = 100.0 * c.sms / device.units if c.sms is not None else c.ratio
        out.setdefault((c.partition_kind, c.interference), []).append(ratio)
    return out


def _check_names(opt: str, counts: dict[str, int], workloads) -> None:
    known = {n for w in workloads for n in (w.key, w.name)}
    unknown = [name for name in counts if name not in known]
    if unknown:
        raise ConfigError(f"{opt} {unknown[0]}={counts[unknown[0]]}: no such workload in this bundle "
                          f"(known: {', '.join(w.name or w.key for w in workloads)})")


def _by_count(workloads, default: int, per_wl: dict[str, int]) -> dict[int, list]:
    """The workloads grouped by their number of new candidates per share."""
    out: dict[int, list] = {}
    for w in workloads:
        n = next((per_wl[k] for k in (w.key, w.name) if k in per_wl), default)
        out.setdefault(n, []).append(w)
    return out


def _summary(db, device, manifest: dict) -> dict:
    out = {}
    for wk in manifest["workloads"]:
        sources = [c["source"] for c in manifest["candidates"] if c["workload_key"] == wk]
        out[wk] = {"measured": db.count_measurements(workload_key=wk, device_id=device.id),
                   "new": sum(s in NEW for s in sources)} | {k: sources.count(k) for k in
                                                              ("uniform", "transfer", "best", "matrix")}
    return out
