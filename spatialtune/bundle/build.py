"""Build a bundle (CPU host, full TVM): candidates chosen by the search policy, built with cubins.

Round 1 (no database): a fresh search per workload, ranked by a cost model of no data (random
scores: it explores). Next rounds (``db_path``): for each workload and each share measured there
(``shares`` selects them, as conditions such as ``mps:25`` or ``green:32sm``; default: every
share without a neighbour), the one policy of :mod:`spatialtune.search.policy` — the same code
``tune`` runs — proposes ``candidates`` new kernels for that share (a stated ``explore`` fraction
of them uniform samples), plus the configs best elsewhere that the share has not measured
(``transfer``). Each share's ``transfer_top`` winners already measured everywhere are carried as
``best``, re-measured beside the new candidates so the run's table compares them on the same
machine (the import keeps the first measurement of a kernel under a key).

Every candidate records the conditions it is for (``for``): the run measures it under each of
them whatever its speed elsewhere.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from ..device import DeviceInfo, detect_cpu, target_for, tvm_version
from ..errors import ConfigError, DeviceError
from ..search.cost_model import CostModel, create_cost_model
from ..search.evolution import EvolutionConfig, SearchRun
from ..search.policy import (KeyId, PolicyOptions, SharePolicy, TrainingSet, best_by_key, fit_share_model,
                             missing_winners)
from ..search.space import candidate_from_trace
from ..search.uniform import UniformSampler
from ..store.records import SavedCostModel
from ..terms import WHOLE, norm_ratio, parse_condition
from . import FORMAT
from .manifest import condition_key, write_json

log = logging.getLogger(__name__)


def build_bundle(space: str, workload_names: Sequence[str], out: str, *, candidates: int = 32, target: str = "cuda",
                 arch: str | None = None, seed: int = 0, build_workers: int = 2, cost_model: str = "random",
                 db_path: str | None = None, device_id: str | None = None, shares: Sequence[str] = (),
                 workload_candidates: dict[str, int] | None = None, transfer_top: int = 2,
                 seeds_per_share: int = 16, explore: dict[str, int] | None = None,
                 evolution: EvolutionConfig | None = None) -> dict:
    """Choose and build candidates; write ``manifest.json`` under ``out``; return the manifest.

    ``candidates``: new candidates per workload (round 1) or per workload and share (``db_path``);
    ``workload_candidates`` (name or key -> count) overrides it per workload, 0 building only the
    transfers and winners. ``explore`` (name or key -> count): that many more uniform samples of
    the design space per workload, none measured before.
    """
    from ..measure.builder import BuildInput, LocalBuilder
    from ..workloads.spec import load_space

    if target not in ("cuda", "cpu"):
        raise ConfigError(f"bundle target must be cuda (or cpu, to exercise the loop on this host), got {target!r}")
    if candidates < 0 or (candidates == 0 and not db_path and not any((explore or {}).values())):
        raise ConfigError(f"--candidates must be positive (0 only with --db or --explore), got {candidates}")
    if transfer_top < 0 or seeds_per_share < 0:
        raise ConfigError("--transfer-top and --seeds-per-share must not be negative")
    workloads = load_space(space).select(workload_names)
    per_wl = _per_workload_counts(workloads, candidates, workload_candidates or {},
                                  allow_zero=bool(db_path) or any((explore or {}).values()))
    n_explore = _per_workload_counts(workloads, 0, explore or {}, allow_zero=True)
    db = dev = None
    if db_path:
        from ..store.database import TuningDatabase

        db = TuningDatabase(Path(db_path), create=False)
        dev = pick_device(db, device_id, target)
    device = _bundle_device(target, arch, dev)
    tgt = target_for(device)
    options = PolicyOptions(cost_model=cost_model, transfer_top=transfer_top, seeds_per_share=seeds_per_share,
                            evolution=evolution or EvolutionConfig())
    out_p = Path(out)
    if (out_p / "manifest.json").exists():
        shutil.rmtree(out_p / "kernels", ignore_errors=True)
    out_p.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "space": str(space),
                "target": tgt, "arch": device.arch, "tvm_version": tvm_version(), "seed": seed, "workloads": {},
                "candidates": []}
    if dev is not None:
        manifest["round"] = {"db": str(db_path), "device_id": dev["id"], "device": dev["name"], "workloads": {}}
    t0 = time.perf_counter()
    try:
        with LocalBuilder(out_p / "kernels", workers=build_workers) as builder:
            for w in workloads:
                if db is None:
                    cands, notes = _first_round(w, tgt, device, per_wl[w.key], options, seed)
                else:
                    cands, notes, info = _next_round(w, tgt, db, dev, per_wl[w.key], shares, options, seed)
                    manifest["round"]["workloads"][w.key] = info
                if n_explore[w.key]:
                    seen = {c.mod_hash for c in cands}
                    if db is not None:
                        seen |= {m.mod_hash for m in db.measurements(workload_key=w.key, device_id=dev["id"])}
                    more = UniformSampler(w, tgt, seed=seed).sample(n_explore[w.key], exclude=seen)
                    log.info("%s: %d uniform samples of the design space", w.key, len(more))
                    cands += more
                    notes += [{"source": "explore", "shares": [], "for": []} for _ in more]
                    if db is not None:
                        manifest["round"]["workloads"][w.key]["explore"] = len(more)
                if not cands:
                    raise DeviceError(f"the search produced no candidate for {w.key}")
                builder.artifact_dir = str(out_p / "kernels" / w.key)
                built = builder.build([BuildInput.of(c, w.key, w.fast_math) for c in cands], tgt)
                manifest["workloads"][w.key] = w.to_dict() | {"key": w.key, "flops": w.flops}
                if w.prim is not None:
                    # The run host may have no compiler: a PrimFunc's float64 reference is built here.
                    manifest["workloads"][w.key]["reference_lib"] = _reference_lib(w, out_p)
                for i, (c, b, note) in enumerate(zip(cands, built, notes)):
                    manifest["candidates"].append({
                        "id": f"{w.key}/{i}", "index": i, "workload_key": w.key, "mod_hash": c.mod_hash,
                        "trace": c.trace, "source": note["source"], "shares": note["shares"], "for": note["for"],
                        "search_s": c.search_s, "build_s": b.build_s,
                        "features": None if c.features is None else [float(x) for x in c.features],
                        "artifact": os.path.relpath(b.artifact, out_p) if b.ok else None,
                        "cubin": os.path.relpath(b.cubin, out_p) if b.ok and b.cubin else None,
                        "status": "ok" if b.ok else "build_error", "error": b.error})
                log.info("%s: %d candidates (%s), %d built", w.key, len(cands),
                         ", ".join(f"{k} {v}" for k, v in _count_sources(notes).items()), sum(b.ok for b in built))
    finally:
        if db is not None:
            db.close()
    if target == "cuda":
        _build_support(out_p, device.arch, manifest)
    manifest["build_s"] = round(time.perf_counter() - t0, 1)
    write_json(out_p / "manifest.json", manifest)
    return manifest


def _bundle_device(target: str, arch: str | None, dev: dict | None) -> DeviceInfo:
    """The device the bundle compiles for: this host's CPU, or a GPU named by ``--arch`` or by the
    database's device (its compute capability)."""
    if target == "cpu":
        return detect_cpu()
    if dev is not None:
        if arch and dev.get("arch") and dev["arch"] != arch:
            raise ConfigError(f"device {dev['id']} ({dev['name']}) is {dev['arch']}, the bundle would be {arch}: "
                              f"pass --arch {dev['arch']}")
        return DeviceInfo.from_dict(dev | {"arch": arch or dev.get("arch") or ""})
    if not arch:
        raise ConfigError("--arch is needed for a first CUDA round: this host has no GPU to ask and there is no "
                          "--db device (e.g. --arch sm_90 for an H100 or H200)")
    return DeviceInfo(kind="cuda", name="", units=1, unit="SM", arch=arch)


def _first_round(w, tgt: dict, device: DeviceInfo, n: int, options: PolicyOptions, seed: int):
    if not n:
        return [], []
    policy = SharePolicy(w, tgt, KeyId("-", WHOLE, "none"), [], create_cost_model(options.cost_model, seed=seed),
                         share_units=(device.units, device.units), options=options,
                         run=SearchRun(batch=min(n, 64), seed=seed))
    try:
        cands = policy.propose(n)
    finally:
        policy.close()
    return cands, [{"source": c.source, "shares": [], "for": []} for c in cands]


def _build_support(out_p: Path, arch: str, manifest: dict) -> None:
    from ..cuda.cubin import compile_source
    from ..cuda.green import build_green_shim
    from ..neighbours.gpu import NEIGHBOUR_CU

    sup = out_p / "support"
    sup.mkdir(exist_ok=True)
    compile_source(NEIGHBOUR_CU, str(sup / "neighbour.cubin"), arch)
    try:
        build_green_shim(str(sup / "green_shim.so"))
        manifest["green_shim"] = "support/green_shim.so"
    except DeviceError as e:  # the GPU host can build it too, if it has a C compiler
        log.warning("%s", e)
    manifest["neighbour_cubin"] = "support/neighbour.cubin"


def _reference_lib(w, out_p: Path) -> str:
    """Build ``w``'s float64 reference (:mod:`spatialtune.workloads.prim`) for the host CPU family
    into the bundle; returns its path relative to the bundle."""
    from ..workloads.prim import build_reference

    path = out_p / "reference" / f"{w.key}.so"
    path.parent.mkdir(parents=True, exist_ok=True)
    build_reference(w.prim, str(path))
    return os.path.relpath(path, out_p)


def _per_workload_counts(workloads, default: int, overrides: dict[str, int], *, allow_zero: bool) -> dict[str, int]:
    out = {w.key: default for w in workloads}
    for name, n in overrides.items():
        hit = [w.key for w in workloads if name in (w.key, w.name)]
        if not hit:
            raise ConfigError(f"--workload-candidates {name}={n}: no such workload in this bundle "
                              f"(known: {', '.join(w.name or w.key for w in workloads)})")
        if n < 0 or (n == 0 and not allow_zero):
            raise ConfigError(f"--workload-candidates {name}={n}: expected a positive count"
                              + (" (0 only with --db)" if not allow_zero else ""))
        for k in hit:
            out[k] = n
    return out


def _count_sources(notes: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in notes:
        out[n["source"]] = out.get(n["source"], 0) + 1
    return out


def pick_device(db, device_id: str | None, kind: str = "cuda") -> dict:
    """The device of ``db`` to continue from: ``device_id``, else the only one of ``kind``."""
    devs = db.devices()
    if device_id:
        d = next((d for d in devs if d["id"] == device_id), None)
        if d is None:
            raise ConfigError(f"{db.path}: no device {device_id!r} (recorded: "
                              f"{', '.join(x['id'] for x in devs) or 'none'})")
        if d["kind"] != kind:
            raise ConfigError(f"{db.path}: device {device_id} is a {d['kind']} device, this bundle is for {kind}")
        return d
    mine = [d for d in devs if d["kind"] == kind]
    if not mine:
        what = "GPU" if kind == "cuda" else kind
        raise ConfigError(f"{db.path}: no {what} device recorded (import a bundle run first: spatialtune bundle import)")
    if len(mine) > 1:
        raise ConfigError(f"{db.path}: {len(mine)} {kind} devices recorded "
                          f"({'; '.join(d['id'] + ' ' + d['name'] for d in mine)}): choose one with --device ID")
    return mine[0]


def share_label(key: KeyId, units: int) -> str:
    if key.partition == "green" and units and key.ratio < 100:
        sms = key.ratio * units / 100.0
        amount = f"{round(sms)}sm" if abs(sms - round(sms)) < 0.01 else f"{key.ratio:g}%"
    else:
        amount = f"{key.ratio:g}%"
    return f"{key.partition}:{amount}" + ("" if key.interference == "none" else f":{key.interference}")


def _select_shares(keys: set[KeyId], selectors: Sequence[str], units: int) -> list[KeyId]:
    """The keys to search: the selected ones, else the quiet ones measured."""
    if not selectors:
        return sorted((k for k in keys if k.interference == "none"),
                      key=lambda k: (k.partition != "mps", k.partition, -k.ratio))
    out = []
    for text in selectors:
        c = parse_condition(text)
        if c.sms is not None:
            ratio = norm_ratio(100.0 * c.sms / units)
        elif c.partition_kind in ("green", "cpu"):  # core sets and green contexts are keyed by what they grant
            ratio = _granted_ratio(c.partition_kind, c.ratio, units)
        else:
            ratio = norm_ratio(c.ratio)
        k = KeyId(c.partition_kind, ratio, c.interference)
        if k not in keys:
            log.info("share %s has no measurement yet: searched from the other shares' configs", text)
        if k not in out:
            out.append(k)
    return out


def _granted_ratio(kind: str, ratio: float, units: int) -> float:
    from ..partitions.sm import sms_for_ratio

    if kind == "green":
        return norm_ratio(100.0 * sms_for_ratio(ratio, units) / units)
    got = min(units, max(1, round(ratio / 100.0 * units)))
    return norm_ratio(100.0 * got / units)


def _next_round(w, tgt: dict, db, dev: dict, n: int, selectors: Sequence[str], options: PolicyOptions, seed: int):
    """New candidates for ``w`` per share from its measurements on ``dev``, plus each share's winners."""
    rows = db.measurements(workload_key=w.key, device_id=dev["id"], with_features=True)
    total = int(dev["units"])
    keys = {KeyId.of(m) for m in rows}
    chosen = _select_shares(keys, selectors, total)
    if not chosen:
        raise ConfigError(f"{w.key}: nothing measured on {dev['id']} without a neighbour to continue from "
                          f"(choose shares with --share)")
    labels = {k: share_label(k, total) for k in chosen}
    measured_all = {m.mod_hash for m in rows}
    new, notes = [], []
    transfers: dict[str, tuple] = {}  # mod_hash -> (candidate, keys it is new to)
    taken: set[str] = set()
    info = {"measured": len(rows), "shares": {}}
    for k in chosen:
        units = next((m.granted_units for m in rows if KeyId.of(m) == k and m.granted_units),
                     max(1, round(k.ratio * total / 100)))
        model, saved = _model_for(db, dev, k, options, seed)
        policy = SharePolicy(w, tgt, k, rows, model, share_units=(units, total), options=options,
                             run=SearchRun(batch=max(1, min(n or 1, 64)), seed=seed))
        try:
            moved = policy.transfers()
            got = policy.propose(n, exclude=lambda h: h in measured_all or h in taken) if n else []
        finally:
            policy.close()
        for c in moved:
            transfers.setdefault(c.mod_hash, (c, []))[1].append(k)
        new += got
        taken = {c.mod_hash for c in new}
        notes += [{"source": c.source, "shares": [labels[k]], "for": [condition_key(k.partition, k.ratio,
                                                                                     k.interference)]} for c in got]
        here = [m for m in rows if KeyId.of(m) == k]
        info["shares"][labels[k]] = {"measured": len(here), "cost_model": saved.kind if saved else None,
                                     "cost_model_samples": saved.n_samples if saved else 0,
                                     "seeds": policy.n_seeds,
                                     "new": len(got), "transfers_in": len(moved)}
        log.info("%s %s: %d measured, model %s (%s samples) -> %d new, %d configs of other conditions to measure "
                 "here", w.key, labels[k], len(here), saved.kind if saved else options.cost_model,
                 saved.n_samples if saved else 0, len(got), len(moved))
    cands, out_notes = list(new), list(notes)
    for c, to in transfers.values():
        cands.append(c)
        out_notes.append({"source": "transfer", "shares": sorted({labels[k] for k in to}),
                          "for": [condition_key(k.partition, k.ratio, k.interference) for k in to]})
    # winners measured at every chosen share: re-measured beside the new candidates, as the reference
    index = {c.mod_hash: i for i, c in enumerate(cands)}
    best_of = best_by_key(rows)
    for k in chosen:
        for m in best_of.get(k, [])[: options.transfer_top]:
            if m.mod_hash in index:
                continue
            c = candidate_from_trace(w, m.trace, "best", m.features, m.mod_hash)
            if c is not None:
                index[c.mod_hash] = len(cands)
                cands.append(c)
                out_notes.append({"source": "best", "shares": [labels[k]],
                                  "for": [condition_key(kk.partition, kk.ratio, kk.interference) for kk in chosen]})
    # the winners matrix: every condition's fastest kernels under every condition measured so far
    # (the configs the single- vs multi-tenant comparison needs are among them)
    for k, configs in missing_winners(rows, options.matrix_top).items():
        ck = condition_key(k.partition, k.ratio, k.interference)
        for m in configs:
            if m.mod_hash not in index:
                c = candidate_from_trace(w, m.trace, "matrix", m.features, m.mod_hash)
                if c is None:
                    continue
                index[c.mod_hash] = len(cands)
                cands.append(c)
                out_notes.append({"source": "matrix", "shares": [], "for": []})
            note = out_notes[index[m.mod_hash]]
            if ck not in note["for"]:
                note["for"].append(ck)
                note["shares"].append(share_label(k, total))
    info |= {"new": len(new), "transfer": sum(nt["source"] == "transfer" for nt in out_notes),
             "best": sum(nt["source"] == "best" for nt in out_notes),
             "matrix": sum(nt["source"] == "matrix" for nt in out_notes)}
    return cands, out_notes, info


def _model_for(db, dev: dict, k: KeyId, options: PolicyOptions, seed: int) -> tuple[CostModel, SavedCostModel | None]:
    """The share's saved model, or one fit now on the device's measurements (the same training as
    ``tune``), or an untrained one of ``options.cost_model``."""
    saved = db.load_cost_model(dev["id"], k.partition, k.ratio, k.interference)
    if saved:
        model = CostModel.from_json(saved.model)
        if model.trained:
            return model, saved
    model = create_cost_model(options.cost_model, seed=seed)
    data = TrainingSet(int(dev["units"]))
    data.add_rows(db.measurements(device_id=dev["id"], partition=k.partition, interference=k.interference,
                                  status="ok", with_features=True))
    if model.kind != "random" and fit_share_model(model, data, k.ratio, options.own_share_weight,
                                                        options.transfer_fade_rows):
        return model, SavedCostModel(model.kind, "", len(data))
    if saved is None:
        log.warning("%s: no cost model saved in the database; ranking with %r", share_label(k, int(dev["units"])),
                    options.cost_model)
    return model, saved
