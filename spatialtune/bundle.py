"""Measurement bundles: search and build on a CPU host, measure on a GPU host, import back.

A GPU host may have no package index and only a runtime-only TVM, numpy and cuda-bindings. So:

- ``build_bundle`` (CPU host, full TVM): candidates from the search, each built to an exported
  ``.so`` plus a cubin (``kernels/<workload>/<mod_hash>.{so,cubin}``), the neighbour kernels'
  cubin, the green-context shim, and ``manifest.json`` (workload specs, traces, mod hashes,
  features for the cost model, target and arch).
- ``run_bundle`` (GPU host): measures every candidate under a list of conditions (partition,
  share, interference) with the same runner and workers as ``tune``, and writes
  ``results.json`` (the device as read there, every measurement) after each condition, so a run
  cut short still leaves what it measured. Imports no database, xgboost or full TVM.
- ``import_results`` (CPU host): records everything in the tuning database and retrains the
  per-share cost models, so the next search round starts from these measurements.
- ``build_bundle(..., db_path=...)``: that next round. Per workload and share, the saved cost
  model ranks an evolutionary search seeded with what was measured (never proposing a measured
  kernel again), and each share's winners come along to be measured at the other shares.

A bundle can also be built for this host's cores (``target="cpu"``, conditions ``cpu:RATIO``):
the same build, run, import and next round, without a GPU (what the round-trip tests use).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import ConfigError, DeviceError

log = logging.getLogger(__name__)

FORMAT = 1


# ---------------------------------------------------------------- build (CPU host)


def build_bundle(space: str, workload_names: Sequence[str], out: str, *, candidates: int = 32, target: str = "cuda",
                 arch: str = "sm_90", seed: int = 0, build_workers: int = 2, cost_model: str = "random",
                 db_path: str | None = None, device_id: str | None = None, shares: Sequence[str] = (),
                 workload_candidates: dict[str, int] | None = None, transfer_top: int = 2,
                 seeds_per_share: int = 8, explore: dict[str, int] | None = None) -> dict:
    """Search ``candidates`` kernels per workload, build them (with cubins for CUDA), write the manifest.

    Without ``db_path`` this is round 1: a fresh search with a ``cost_model`` of no data. With
    ``db_path`` it is the next round of the same loop, seeded from the measurements a bundle run
    left in that database for one device (``device_id``, or the only one of the target's kind):
    for each workload and each share measured there (``shares`` selects them, as conditions such
    as ``mps:25`` or ``green:32sm``; default: every share without a neighbour), the share's saved
    cost model ranks an :class:`EvolutionarySearch` whose ``measured`` set is what that share
    already measured (never proposed again: no new candidate was measured under *any* key of the
    workload) and whose ``seeds`` are the best configs of the other shares. Each share's
    ``transfer_top`` best configs join the bundle too: as ``transfer`` candidates where another
    share has not measured them, else as ``best`` (re-measured beside the new ones, so the run's
    table compares the new candidates with the known winners on the same machine; the import
    keeps the first measurement of a kernel under a key). ``workload_candidates`` (name or key
    -> count) overrides ``candidates`` per workload; 0 builds only the transfers and winners.
    ``explore`` (name or key -> count) adds that many uniform samples of the design space
    (MetaSchedule's ``ReplayTrace``, no cost model), none measured before: diversity the
    evolution around the known winners does not give.
    """
    from .builder import BuildInput, LocalBuilder, target_for
    from .cost_model import create_cost_model
    from .device import detect_cpu, tvm_version
    from .search import EvolutionarySearch
    from .spec import load_space

    if target not in ("cuda", "cpu"):
        raise ConfigError(f"bundle target must be cuda (or cpu, to exercise the loop on this host), got {target!r}")
    if candidates < 0 or (candidates == 0 and not db_path and not any((explore or {}).values())):
        raise ConfigError(f"--candidates must be positive (0 only with --db or --explore), got {candidates}")
    if transfer_top < 0 or seeds_per_share < 0:
        raise ConfigError("--transfer-top and --seeds-per-share must not be negative")
    workloads = load_space(space).select(workload_names)
    # 0 search candidates: only the winners (--db) or only uniform samples (--explore: a random pool)
    per_wl = _per_workload_counts(workloads, candidates, workload_candidates or {},
                                  allow_zero=bool(db_path) or any((explore or {}).values()))
    n_explore = _per_workload_counts(workloads, 0, explore or {}, allow_zero=True)
    if target == "cpu":
        arch = detect_cpu().arch
    tgt = target_for(target, arch=arch)
    db = dev = None
    if db_path:
        from .database import TuningDatabase

        db = TuningDatabase(Path(db_path), create=False)
        dev = pick_device(db, device_id, "cuda" if target == "cuda" else "cpu")
        if target == "cuda" and dev.get("arch") and dev["arch"] != arch:
            db.close()
            raise ConfigError(f"device {dev['id']} ({dev['name']}) is {dev['arch']}, the bundle would be {arch}: "
                              f"pass --arch {dev['arch']}")
    out_p = Path(out)
    if (out_p / "manifest.json").exists():
        shutil.rmtree(out_p / "kernels", ignore_errors=True)
    out_p.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "space": str(space),
                "target": tgt, "arch": arch, "tvm_version": tvm_version(), "seed": seed, "workloads": {},
                "candidates": []}
    if dev is not None:
        manifest["round"] = {"db": str(db_path), "device_id": dev["id"], "device": dev["name"], "workloads": {}}
    t0 = time.perf_counter()
    try:
        with LocalBuilder(out_p / "kernels", workers=build_workers) as builder:
            for w in workloads:
                n = per_wl[w.key]
                if db is None:
                    model = create_cost_model(cost_model, seed=seed) if cost_model == "random" else \
                        create_cost_model(cost_model)
                    cands = _fresh_candidates(EvolutionarySearch(w, tgt, model, batch=n, rand_state=seed), n) \
                        if n else []
                    notes = [{"source": "search", "shares": []} for _ in cands]
                else:
                    cands, notes, info = _next_round_candidates(
                        w, tgt, db, dev, n, shares, seed=seed, cost_model=cost_model, transfer_top=transfer_top,
                        seeds_per_share=seeds_per_share)
                    manifest["round"]["workloads"][w.key] = info
                if n_explore[w.key]:
                    seen = {c.mod_hash for c in cands}
                    if db is not None:
                        seen |= {m.mod_hash for m in db.measurements(workload_key=w.key, device_id=dev["id"])}
                    more = _explore_candidates(w, tgt, n_explore[w.key], seen, seed)
                    log.info("%s: %d uniform samples of the design space", w.key, len(more))
                    cands += more
                    notes += [{"source": "explore", "shares": []} for _ in more]
                    if db is not None:
                        manifest["round"]["workloads"][w.key]["explore"] = len(more)
                if not cands:
                    raise DeviceError(f"the search produced no candidate for {w.key}")
                wdir = out_p / "kernels" / w.key
                builder.artifact_dir = str(wdir)
                built = builder.build([BuildInput(c.mod_json, c.mod_hash) for c in cands], tgt)
                manifest["workloads"][w.key] = w.to_dict() | {"key": w.key, "flops": w.flops}
                for i, (c, b, note) in enumerate(zip(cands, built, notes)):
                    manifest["candidates"].append({
                        "id": f"{w.key}/{i}", "index": i, "workload_key": w.key, "mod_hash": c.mod_hash,
                        "trace": c.trace, "source": note["source"], "shares": note["shares"],
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
        _build_support(out_p, arch, manifest)
    manifest["build_s"] = round(time.perf_counter() - t0, 1)
    (out_p / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _build_support(out_p: Path, arch: str, manifest: dict) -> None:
    from .cubin import compile_source
    from .gpu_interference import NEIGHBOUR_CU
    from .gpu_runtime import build_green_shim

    sup = out_p / "support"
    sup.mkdir(exist_ok=True)
    compile_source(NEIGHBOUR_CU, str(sup / "neighbour.cubin"), arch)
    try:
        build_green_shim(str(sup / "green_shim.so"))
        manifest["green_shim"] = "support/green_shim.so"
    except DeviceError as e:  # the GPU host can build it too, if it has a C compiler
        log.warning("%s", e)
    manifest["neighbour_cubin"] = "support/neighbour.cubin"


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


def _fresh_candidates(search, n: int, exclude: set[str] = frozenset()) -> list:
    """Up to ``n`` new candidates from ``search``, none of them in ``exclude`` (mod hashes)."""
    cands: list = []
    tries = 0
    try:
        while len(cands) < n and tries < 6:
            tries += 1
            got = search.ask(n - len(cands))
            if not got:
                break
            search.tell(got, [None] * len(got))  # unmeasured here: keep MetaSchedule's bookkeeping in step
            cands += [c for c in got if c.mod_hash not in exclude and all(c.mod_hash != o.mod_hash for o in cands)]
    finally:
        search.close()
    return cands


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


def _share_label(partition: str, ratio: float, interference: str, units: int) -> str:
    if partition == "green" and units:
        sms = ratio * units / 100.0
        amount = f"{round(sms)}sm" if abs(sms - round(sms)) < 0.01 and ratio < 100 else f"{ratio:g}%"
    else:
        amount = f"{ratio:g}%"
    return f"{partition}:{amount}" + ("" if interference == "none" else f":{interference}")


def _select_shares(keys: set[tuple], selectors: Sequence[str], units: int) -> list[tuple]:
    """(partition, ratio, interference) keys to search: the selected ones, else the quiet ones."""
    from .database import norm_ratio

    if not selectors:
        return sorted((k for k in keys if k[2] == "none"), key=lambda k: (k[0] != "mps", k[0], -k[1]))
    out = []
    for text in selectors:
        c = parse_condition(text)
        ratio = norm_ratio(100.0 * c.sms / units) if c.sms is not None else norm_ratio(c.ratio)
        match = [k for k in keys if k[0] == c.partition and k[2] == c.interference and abs(k[1] - ratio) < 0.01]
        k = match[0] if match else (c.partition, ratio, c.interference)
        if not match:
            log.info("share %s has no measurement yet: searched from the other shares' configs", text)
        if k not in out:
            out.append(k)
    return out


def _next_round_candidates(w, tgt: dict, db, dev: dict, n: int, selectors: Sequence[str], *, seed: int,
                           cost_model: str, transfer_top: int, seeds_per_share: int):
    """New candidates for ``w`` from its measurements on ``dev`` in ``db``, plus each share's winners."""
    import zlib

    from .cost_model import CostModel, create_cost_model
    from .database import norm_ratio
    from .search import EvolutionarySearch

    rows = db.measurements(workload_key=w.key, device_id=dev["id"], with_features=True)
    key_of = {id(m): (m.partition, norm_ratio(m.ratio), m.interference) for m in rows}
    keys = set(key_of.values())
    shares = _select_shares(keys, selectors, int(dev["units"]))
    if not shares:
        raise ConfigError(f"{w.key}: nothing measured on {dev['id']} without a neighbour to continue from "
                          f"(choose shares with --share)")
    labels = {k: _share_label(*k, int(dev["units"])) for k in shares}
    measured_all = {m.mod_hash for m in rows}
    by_key: dict[tuple, list] = {k: [] for k in shares}
    for m in rows:
        if key_of[id(m)] in by_key:
            by_key[key_of[id(m)]].append(m)
    best_of = {k: sorted((m for m in ms if m.status == "ok"), key=lambda m: m.median_s) for k, ms in by_key.items()}
    quota = {k: n // len(shares) + (1 if i < n % len(shares) else 0) for i, k in enumerate(shares)}
    new: list = []
    new_notes: list[dict] = []
    transfers: dict[str, tuple] = {}  # mod_hash -> (candidate, shares it is new to)
    info = {"measured": len(rows), "shares": {}}
    left = 0
    for i, k in enumerate(shares):
        here = by_key[k]
        others = sorted((m for kk, ms in best_of.items() if kk != k for m in ms[:seeds_per_share]),
                        key=lambda m: m.median_s)
        saved = db.load_cost_model(dev["id"], *k)
        if saved:
            model = CostModel.from_json(saved[1])
        else:
            log.warning("%s %s: no cost model saved in the database; ranking with %r", w.key, labels[k], cost_model)
            model = create_cost_model(cost_model, seed=seed) if cost_model == "random" else create_cost_model(cost_model)
        want = quota[k] + left
        rs = (seed * 7919 + len(rows) * 31 + zlib.crc32(labels[k].encode())) % (2**31 - 1)
        search = EvolutionarySearch(w, tgt, model, measured=[(m.trace, m.median_s if m.status == "ok" else None)
                                                             for m in here],
                                    seeds=[(m.trace, m.median_s) for m in others], batch=max(1, want), rand_state=rs)
        # the other shares' winners, measured here where they are not yet
        winners = []
        for kk, ms in best_of.items():
            if kk != k:
                winners += [m.trace for m in ms[:transfer_top]]
        moved = search.transfer(winners)
        for c in moved:
            transfers.setdefault(c.mod_hash, (c, []))[1].append(labels[k])
        if want > 0:
            got = _fresh_candidates(search, want, measured_all | {c.mod_hash for c in new})
        else:
            got = []
            search.close()
        left = want - len(got)
        new += got
        new_notes += [{"source": "search", "shares": [labels[k]]} for _ in got]
        info["shares"][labels[k]] = {"measured": len(here), "cost_model": saved[0] if saved else None,
                                     "cost_model_samples": saved[2] if saved else 0, "seeds": len(others),
                                     "new": len(got), "transfers_in": len(moved)}
        log.info("%s %s: %d measured, model %s (%s samples), %d seeds -> %d new, %d winners of other shares to "
                 "measure here", w.key, labels[k], len(here), saved[0] if saved else cost_model,
                 saved[2] if saved else 0, len(others), len(got), len(moved))
    cands = list(new)
    notes = list(new_notes)
    for h, (c, to) in transfers.items():  # winners some share has not measured yet
        cands.append(c)
        notes.append({"source": "transfer", "shares": sorted(set(to))})
    # winners measured at every share: re-measured beside the new candidates, as the run's reference
    seen = {c.mod_hash for c in cands}
    for k in shares:
        for m in best_of[k][:transfer_top]:
            if m.mod_hash in seen:
                continue
            seen.add(m.mod_hash)
            c = _replayed(w, m)
            if c is not None:
                cands.append(c)
                notes.append({"source": "best", "shares": [labels[k]]})
    info |= {"new": len(new), "transfer": sum(nt["source"] == "transfer" for nt in notes),
             "best": sum(nt["source"] == "best" for nt in notes)}
    return cands, notes, info


def _explore_candidates(w, tgt: dict, n: int, exclude: set[str], seed: int) -> list:
    """``n`` uniform samples of the workload's design space (``ReplayTrace``), none in ``exclude``."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from .cost_model import pool_features
    from .search import Candidate, mod_hash, trace_to_json

    t0 = time.perf_counter()
    mod = w.ir_module()
    ctx = ms.TuneContext(mod=mod, target=tvm.target.Target(tgt), space_generator="post-order-apply",
                         search_strategy=ms.search_strategy.ReplayTrace(max_fail_count=2000),
                         task_name=w.key, rand_state=(seed * 7919 + 17) % (2**31 - 1), num_threads=1)
    spaces = ctx.space_generator.generate_design_space(mod)
    want = 2 * n + 8  # ReplayTrace does not know what was measured: ask for more (collisions are rare)
    ctx.search_strategy.pre_tuning(max_trials=want, num_trials_per_iter=want, design_spaces=spaces)
    got = ctx.search_strategy.generate_measure_candidates() or []
    ctx.search_strategy.post_tuning()
    out, seen = [], set(exclude)
    extractor = ms.feature_extractor.PerStoreFeature()
    for c in got:
        h = mod_hash(c.sch.mod)
        if h in seen:
            continue
        seen.add(h)
        feats = pool_features(extractor.extract_from(ctx, [c])[0].numpy())
        out.append(Candidate(mod_hash=h, trace=trace_to_json(c.sch.trace), mod_json=tvm.ir.save_json(c.sch.mod),
                             features=feats, source="explore"))
        if len(out) == n:
            break
    for c in out:
        c.search_s = (time.perf_counter() - t0) / max(1, len(out))
    return out


def _replayed(w, m):
    """A measured config as a candidate to build again (its trace replayed, its stored features)."""
    import tvm

    from .search import Candidate, apply_trace, mod_hash

    try:
        sch = apply_trace(w, m.trace)
    except Exception as e:  # a trace of another TVM version
        log.warning("%s: a measured config does not replay (%s); left out", w.key, e)
        return None
    h = mod_hash(sch.mod)
    if h != m.mod_hash:
        log.warning("%s: config %s replays to %s; left out", w.key, m.mod_hash, h)
        return None
    return Candidate(mod_hash=h, trace=m.trace, mod_json=tvm.ir.save_json(sch.mod), features=m.features,
                     source="best")


def load_manifest(bundle: str) -> dict:
    p = Path(bundle) / "manifest.json"
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{bundle}: not a bundle (no manifest.json)") from None
    if m.get("format") != FORMAT:
        raise ConfigError(f"{p}: bundle format {m.get('format')!r}, expected {FORMAT}")
    return m


# ---------------------------------------------------------------- conditions


@dataclass(frozen=True)
class Condition:
    partition: str  # mps | green (cpu for a bundle built for this host's cores)
    ratio: float | None = None  # percent (mps, or green by ratio)
    sms: int | None = None  # green by SM count
    interference: str = "none"

    @property
    def label(self) -> str:
        amount = f"{self.sms}sm" if self.sms is not None else f"{self.ratio:g}%"
        return f"{self.partition}:{amount}" + ("" if self.interference == "none" else f":{self.interference}")


def parse_condition(text: str) -> Condition:
    """``mps:50``, ``green:64sm``, ``green:48.5``, ``mps:50:compute``, ``mps:50:tenant:mm_1024``, ``cpu:50``."""
    from .interference import check_interference
    from .partition import check_ratio

    parts = text.split(":", 2)
    if len(parts) < 2 or parts[0] not in ("mps", "green", "cpu"):
        raise ConfigError(f"condition {text!r}: expected PARTITION:SHARE[:INTERFERENCE], e.g. mps:50 or green:64sm")
    amount = parts[1].strip().lower().rstrip("%")
    interf = check_interference(parts[2]) if len(parts) > 2 else "none"
    try:
        if amount.endswith("sm"):
            if parts[0] != "green":
                raise ConfigError(f"condition {text!r}: SM counts are for green contexts (MPS takes percentages)")
            return Condition(parts[0], sms=int(amount[:-2]), interference=interf)
        return Condition(parts[0], ratio=check_ratio(float(amount)), interference=interf)
    except ValueError:
        raise ConfigError(f"condition {text!r}: {parts[1]!r} is not a share") from None


def conditions_from(partition: str, ratios: Sequence[float], interference: Sequence[str]) -> list[Condition]:
    return [Condition(partition, ratio=r, interference=i) for i in interference for r in ratios]


# ---------------------------------------------------------------- run (GPU host)


def run_bundle(bundle: str, out: str, conditions: Sequence[Condition], *, repeat: int = 5, min_repeat_ms: int = 10,
               timeout: float = 20.0, top: int | None = None, seed: int = 0, vendor: bool = True) -> dict:
    """Measure the bundle's candidates under each condition; returns (and writes) the results.

    ``top``: after the first condition, measure only each workload's ``top`` fastest candidates
    of that condition (the first condition should be the whole device), and the winners a
    next-round bundle carries (``transfer`` and ``best``), which are there to be measured at
    every share.

    ``vendor`` (CUDA only): after each condition's candidates, the same worker measures torch's
    matmul (cuBLAS, fp32 without TF32) for every matmul/dense/batch_matmul workload, under the same
    share and neighbour (:func:`measure_vendor`), into ``results["baselines"]``. Optional: a GPU
    host without torch gives one log line and no baseline rows.

    A bundle built for ``cpu`` runs on this host's cores (conditions ``cpu:RATIO``), with the
    same runner: the loop of build, run and import can then be exercised without a GPU.
    """
    from .runner import LocalRunner, RunInput, RunSettings

    if not conditions:
        raise ConfigError("no conditions to measure")
    man = load_manifest(bundle)
    root = Path(bundle).resolve()
    on_cpu = man.get("target", {}).get("kind") == "llvm"
    bad = [c.label for c in conditions if (c.partition == "cpu") != on_cpu]
    if bad:
        raise ConfigError(f"conditions {', '.join(bad)} do not fit a bundle built for "
                          f"{'cpu (use cpu:RATIO)' if on_cpu else 'cuda (use mps:... or green:...)'}")
    if on_cpu:
        from .device import detect_cpu
        from .partition import create_partition

        device = detect_cpu()
        if device.arch != man["arch"]:
            raise DeviceError(f"bundle built for {man['arch']}, this host is {device.arch}")
        register_tenant = None
    else:
        from .device import detect_cuda
        from .gpu_partition import create as create_gpu_partition
        from .gpu_interference import register_tenant

        device = detect_cuda()
        if device.arch != man["arch"]:
            raise DeviceError(f"bundle built for {man['arch']}, this GPU is {device.arch}")
    dev = device.to_dict() | {"tvm_version": man.get("tvm_version", "")}
    if man.get("neighbour_cubin"):
        os.environ.setdefault("SPATIALTUNE_NEIGHBOUR_CUBIN", str(root / man["neighbour_cubin"]))
    if man.get("green_shim") and (root / man["green_shim"]).exists():
        os.environ.setdefault("SPATIALTUNE_GREEN_SHIM", str(root / man["green_shim"]))
    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "manifest.json", out_p / "manifest.json")
    settings = RunSettings(repeat=repeat, min_repeat_ms=min_repeat_ms, timeout=timeout, seed=seed)
    results = {"format": FORMAT, "device": dev, "bundle": str(root), "settings": vars(settings) | {"top": top},
               "conditions": [], "measurements": [], "baselines": [], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    cands = man["candidates"]
    pool = {c["id"] for c in cands}
    keep = {c["id"] for c in cands if c.get("source") in ("transfer", "best")}
    by_wl = {}
    for c in cands:
        by_wl.setdefault(c["workload_key"], []).append(c)
    t_all = time.perf_counter()
    # Group by partition and keep the order given: a private MPS daemon is stopped before green
    # contexts (non-MPS clients) run.
    order: list[str] = []
    for cond in conditions:
        if cond.partition not in order:
            order.append(cond.partition)
    first = True
    vendor_state: dict = {"off": None} if vendor and not on_cpu else {"off": "not asked for"}
    for kind in order:
        part = create_partition("cpu") if on_cpu else create_gpu_partition(kind, total_sms=device.units)
        with part, LocalRunner(part, device_kind="cpu" if on_cpu else "cuda", settings=settings) as runner:
            for cond in [c for c in conditions if c.partition == kind]:
                share = part.grant_sms(cond.sms) if cond.sms is not None else part.grant(cond.ratio)
                todo = [c for c in cands if c["id"] in pool and c["status"] == "ok"]
                inputs = [RunInput(man["workloads"][c["workload_key"]], str(root / c["artifact"]),
                                   str(root / c["cubin"]) if c.get("cubin") else None) for c in todo]
                t0 = time.perf_counter()
                if cond.interference.startswith("tenant:") and register_tenant is not None:
                    _register_tenants(results, man, root, register_tenant)
                res = runner.run(share, cond.interference, inputs)
                rows = []
                for c, r in zip(todo, res):
                    rows.append({"candidate": c["id"], "workload_key": c["workload_key"], "mod_hash": c["mod_hash"],
                                 "partition": kind, "ratio": share.ratio, "planned_units": share.units,
                                 "total_units": share.total, "interference": cond.interference,
                                 "condition": cond.label} | r.to_dict())
                if first:
                    for c in cands:
                        if c["status"] != "ok":
                            rows.append({"candidate": c["id"], "workload_key": c["workload_key"],
                                         "mod_hash": c["mod_hash"], "partition": kind, "ratio": share.ratio,
                                         "planned_units": share.units, "total_units": share.total,
                                         "interference": cond.interference, "condition": cond.label,
                                         "status": "build_error", "error": c.get("error", "")})
                results["measurements"] += rows
                base = measure_vendor(runner, share, cond, man, vendor_state)
                results["baselines"] += base
                summary = _condition_summary(cond, share, rows, time.perf_counter() - t0, base)
                results["conditions"].append(summary)
                log.info("%s", json.dumps(summary))
                if first and top:
                    pool = set(keep)
                    for wk, cs in by_wl.items():
                        ok = sorted((r for r in rows if r["workload_key"] == wk and r["status"] == "ok"),
                                    key=lambda r: r["median_s"])
                        pool |= {r["candidate"] for r in ok[:top]}
                first = False
                results["elapsed_s"] = round(time.perf_counter() - t_all, 1)
                _write(out_p / "results.json", results)
    return results


def _register_tenants(results: dict, man: dict, root: Path, register) -> None:
    """``tenant:NAME`` runs the best whole-device config measured so far of workload NAME."""
    cand = {c["id"]: c for c in man["candidates"]}
    for wk, w in man["workloads"].items():
        ok = [m for m in results["measurements"] if m["workload_key"] == wk and m["status"] == "ok"
              and m["interference"] == "none"]
        if not ok:
            continue
        top_ratio = max(m["ratio"] for m in ok)
        best = min((m for m in ok if m["ratio"] == top_ratio), key=lambda m: m["median_s"])
        c = cand[best["candidate"]]
        for name in {wk, w.get("name") or wk}:
            register(name, {k: w[k] for k in ("op", "dtype", "params", "name", "model")}, str(root / c["artifact"]),
                     str(root / c["cubin"]) if c.get("cubin") else None)


def measure_vendor(runner, share, cond: Condition, man: dict, state: dict) -> list[dict]:
    """cuBLAS (torch's matmul) for each matmul-like workload of ``man``, in ``runner``'s worker for
    ``share``, next to ``cond``'s neighbour. Never raises for a missing or failing torch: a row
    with that status (and a log line); ``state["off"]`` set once torch is missing, so later
    conditions skip it."""
    from .gpu_runtime import VENDOR_OPS
    from .interference import NeighbourReading, create_interference
    from .worker import WorkerError

    if state.get("off"):
        return []
    wks = [(wk, w) for wk, w in man["workloads"].items() if w.get("op") in VENDOR_OPS]
    if not wks:
        return []
    out = []
    worker = runner.worker_for(share)
    neighbour = create_interference(cond.interference, partition=runner.partition, device_kind=runner.device_kind)
    with neighbour.running(share) as meter:
        for wk, w in wks:
            before = meter.read()
            t0 = time.perf_counter()
            try:
                r = worker.call("spatialtune.gpu_runtime:measure_torch", w, runner.settings, runner._seed(),
                                timeout=max(45.0, 2 * runner.settings.timeout))  # the first imports torch
            except WorkerError as e:
                r = {"status": "timeout" if e.kind == "timeout" else "runtime_error", "error": str(e)[:500]}
                if not worker.alive:
                    log.info("restarting %s after the cuBLAS baseline (%s)", worker.name, e.kind)
                    worker.restart()
                if e.kind != "error":  # a hang or a crash would repeat at every condition: stop asking
                    state["off"] = f"the baseline {e.kind} at {cond.label}"
            row = {"workload_key": wk, "kind": "cublas", "partition": cond.partition, "ratio": share.ratio,
                   "planned_units": share.units, "total_units": share.total, "interference": cond.interference,
                   "condition": cond.label} | r | {"run_s": time.perf_counter() - t0}
            reading = NeighbourReading.between(before, meter.read())
            if reading is not None:
                row |= {"neighbour_throughput": reading.throughput, "neighbour_unit": reading.unit}
            out.append(row)
            if r["status"] == "ok":
                log.info("cuBLAS %s %s: %.1f us (%s SMs seen, rel err %.2g)", wk, cond.label, r["median_s"] * 1e6,
                         r.get("granted_units"), r.get("rel_err") or 0.0)
            else:
                log.warning("cuBLAS baseline %s %s: %s: %s", wk, cond.label, r["status"], r.get("error", ""))
            if r["status"] == "unavailable":
                state["off"] = r.get("error") or "unavailable"
            if state.get("off"):
                log.warning("no more cuBLAS baselines in this run (%s); the candidates are measured as before",
                            state["off"])
                break
    return out


def _condition_summary(cond: Condition, share, rows: list[dict], elapsed: float,
                       baselines: Sequence[dict] = ()) -> dict:
    import numpy as np

    out = {"condition": cond.label, "partition": cond.partition, "ratio": share.ratio, "planned_units": share.units,
           "interference": cond.interference, "elapsed_s": round(elapsed, 1), "workloads": {}}
    for wk in sorted({r["workload_key"] for r in rows}):
        rs = [r for r in rows if r["workload_key"] == wk]
        ok = [r for r in rs if r["status"] == "ok"]
        seen = sorted({r["granted_units"] for r in rs if r.get("granted_units")})
        nb = [r["neighbour_throughput"] for r in rs if r.get("neighbour_throughput")]
        loads = [r["load_s"] for r in rs if r.get("load_s") is not None]
        best = min(ok, key=lambda r: r["median_s"]) if ok else None
        out["workloads"][wk] = {
            "measured": len(rs), "ok": len(ok), "statuses": {s: sum(r["status"] == s for r in rs)
                                                            for s in sorted({r["status"] for r in rs})},
            "best": best and best["candidate"], "best_s": best and best["median_s"], "sms_seen": seen,
            "max_rel_err": max((r["rel_err"] for r in ok if r.get("rel_err") is not None), default=None),
            "median_load_s": float(np.median(loads)) if loads else None,
            "neighbour": float(np.median(nb)) if nb else None,
            "neighbour_unit": next((r["neighbour_unit"] for r in rs if r.get("neighbour_unit")), ""),
            "cublas_s": next((b["median_s"] for b in baselines if b["workload_key"] == wk and b["status"] == "ok"),
                             None)}
    return out


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def load_results(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no results.json") from None


# ---------------------------------------------------------------- report


def format_table(results: dict) -> str:
    """One table: best config per share, regret of the 100%-best config there, SMs seen, neighbour."""
    ms = [m for m in results["measurements"] if m["status"] == "ok"]
    conds = results["conditions"]
    lines = []
    d = results["device"]
    lines.append(f"device: {d['name']} ({d['units']} SMs, driver {d['driver']}, {d['arch']})")
    hdr = (f"{'workload':<26} {'condition':<26} {'SMs seen':>8} {'ok':>7} {'best':>8} {'best us':>9} "
           f"{'100%-best us':>12} {'regret':>6} {'vs100':>6} {'ideal':>6} {'neighbour':>16} {'load ms':>7} "
           f"{'cuBLAS us':>9} {'best/cuBLAS':>11}")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    wks = list(dict.fromkeys(m["workload_key"] for m in results["measurements"]))
    for wk in wks:
        # the reference config: best of the first whole-device condition without a neighbour
        full = [c for c in conds if c["interference"] == "none" and c["planned_units"] >= d["units"]
                and wk in c["workloads"]]
        ref = full[0]["workloads"][wk] if full else None
        ref_cond = full[0]["condition"] if full else None
        ref_id = ref and ref["best"]
        ref_best = {}
        for c in full:
            ref_best[c["partition"]] = c["workloads"][wk]["best_s"]
        for c in conds:
            s = c["workloads"].get(wk)
            if s is None:
                continue
            here = [m for m in ms if m["workload_key"] == wk and m["condition"] == c["condition"]]
            refm = next((m for m in here if m["candidate"] == ref_id), None)
            regret = (refm["median_s"] / s["best_s"]) if refm and s["best_s"] else None
            base = ref_best.get(c["partition"]) or (ref and ref["best_s"])
            vs = (s["best_s"] / base) if base and s["best_s"] else None
            nb = f"{s['neighbour']:.0f} {s['neighbour_unit']}" if s.get("neighbour") else "-"
            seen = ",".join(str(x) for x in s["sms_seen"]) or "-"
            best_idx = s["best"].split("/")[-1] if s["best"] else "-"
            lines.append(
                f"{_short(wk):<26} {c['condition']:<26} {seen:>8} {s['ok']:>3}/{s['measured']:<3} "
                f"{'#' + best_idx:>8} {_us(s['best_s']):>9} {_us(refm and refm['median_s']):>12} "
                f"{_x(regret):>6} {_x(vs):>6} {_x(_ideal(d, s)):>6} {nb:>16} "
                f"{(s['median_load_s'] or 0) * 1e3:>7.1f} {_us(s.get('cublas_s')):>9} "
                f"{_x(s['best_s'] / s['cublas_s'] if s.get('cublas_s') and s['best_s'] else None):>11}")
        lines.append(f"  (100%-best config of {_short(wk)}: #{ref_id.split('/')[-1] if ref_id else '-'} at "
                     f"{ref_cond}; regret = its time here / best time here; vs100 = best here / best at the "
                     f"whole device, same partition; ideal = all SMs / SMs seen; cuBLAS = torch's fp32 matmul "
                     f"without TF32 in the same worker, best/cuBLAS < 1: the tuned kernel is faster)")
    return "\n".join(lines)


def _ideal(d: dict, s: dict) -> float | None:
    seen = s.get("sms_seen") or []
    return d["units"] / seen[0] if len(seen) == 1 and seen[0] else None


# What the H200 probe saw with 48 random candidates (shared/reference/gpu-probe-h200.md).
PROBE_REGRET = {("M1024", 25): 1.27, ("M1024", 12): 1.29, ("M128", 25): 1.56, ("M128", 12): 1.68}


def check_targets(results: dict) -> list[str]:
    """The issue's targets, one line each: correctness, load time, regret, green scaling."""
    import numpy as np

    out = []
    ms = results["measurements"]
    d = results["device"]
    bad = [m for m in ms if m["status"] == "wrong_result"]
    ok = [m for m in ms if m["status"] == "ok"]
    errs = [m["rel_err"] for m in ok if m.get("rel_err") is not None]
    stat = {s: sum(m["status"] == s for m in ms) for s in sorted({m["status"] for m in ms})}
    out.append(f"CHECK correctness: {len(ok)} ok, max rel err {max(errs, default=float('nan')):.2g}; statuses {stat}"
               + ("" if not bad else f"; {len(bad)} wrong results (never timed)"))
    loads = [m["load_s"] for m in ms if m.get("load_s") is not None]
    if loads:
        med, p95 = float(np.median(loads)) * 1e3, float(np.percentile(loads, 95)) * 1e3
        out.append(f"CHECK load per candidate: median {med:.1f} ms, p95 {p95:.1f} ms -> "
                   f"{'PASS' if med < 20 else 'FAIL'} (< 20 ms)")
    conds = {c["condition"]: c for c in results["conditions"]}
    for c in results["conditions"]:
        if c["partition"] != "mps" or c["interference"] != "none" or c["ratio"] not in (25.0, 12.0):
            continue
        for wk in c["workloads"]:
            reg = _regret(results, wk, c["condition"])
            probe = next((v for (tag, r), v in PROBE_REGRET.items() if f"_{tag}_" in wk and r == int(c["ratio"])),
                         None)
            verdict = "-" if reg is None or probe is None else ("PASS" if reg >= probe - 1e-9 else "BELOW")
            out.append(f"CHECK regret {wk} {c['condition']}: {_x(reg)} (probe {_x(probe)}) -> {verdict}")
    full = next((c for c in results["conditions"] if c["partition"] == "green" and c["interference"] == "none"
                 and c["planned_units"] >= d["units"]), None)
    if full:
        for c in results["conditions"]:
            if c["partition"] != "green" or c is full or c["interference"] != "none":
                continue
            for wk, s in c["workloads"].items():
                base = full["workloads"].get(wk, {}).get("best_s")
                if not base or not s["best_s"] or not s["sms_seen"]:
                    continue
                slow, ideal = s["best_s"] / base, d["units"] / s["sms_seen"][0]
                dev = slow / ideal - 1
                mps = _nearest_mps(results, wk, s["sms_seen"][0])
                note = f"; MPS with {mps[0]} SMs seen: {mps[1]:.2f}x" if mps else ""
                out.append(f"INFO green {wk} {c['condition']}: best-kernel slowdown {slow:.2f}x vs SM ratio "
                           f"{ideal:.2f}x ({dev:+.0%}){note} (a matmul that does not fill the GPU scales "
                           f"sublinearly; the SM-count check is the FMA calibration)")
    for b in results.get("baselines", []):
        if b["status"] != "ok":
            out.append(f"INFO cuBLAS {b['workload_key']} {b['condition']}: {b['status']}: {b.get('error', '')[:160]}")
    del conds
    return out


def _nearest_mps(results: dict, wk: str, sms: int):
    """(SMs seen, slowdown of the best kernel) of the MPS condition closest in SMs, no neighbour."""
    cs = [c for c in results["conditions"] if c["partition"] == "mps" and c["interference"] == "none"
          and wk in c["workloads"] and c["workloads"][wk]["sms_seen"]]
    full = next((c for c in cs if c["planned_units"] >= results["device"]["units"]), None)
    if not cs or full is None:
        return None
    c = min(cs, key=lambda c: abs(c["workloads"][wk]["sms_seen"][0] - sms))
    return c["workloads"][wk]["sms_seen"][0], c["workloads"][wk]["best_s"] / full["workloads"][wk]["best_s"]


def _regret(results: dict, wk: str, cond: str) -> float | None:
    first = next((c for c in results["conditions"] if c["interference"] == "none"
                  and c["planned_units"] >= results["device"]["units"] and wk in c["workloads"]), None)
    if first is None:
        return None
    ref = first["workloads"][wk]["best"]
    here = [m for m in results["measurements"] if m["workload_key"] == wk and m["condition"] == cond
            and m["status"] == "ok"]
    if not here:
        return None
    best = min(m["median_s"] for m in here)
    refm = next((m for m in here if m["candidate"] == ref), None)
    return refm["median_s"] / best if refm else None


def _short(wk: str) -> str:
    return wk if len(wk) <= 26 else wk[:25] + "…"


def _us(s) -> str:
    return f"{s * 1e6:.1f}" if s else "-"


def _x(v) -> str:
    return f"{v:.2f}" if v else "-"


# ---------------------------------------------------------------- import (CPU host)


def import_results(results_path: str, db, *, cost_model: str = "xgb") -> dict:
    """Record a bundle run in ``db`` (a TuningDatabase) and retrain the touched cost models."""
    import numpy as np

    from .cost_model import create_cost_model
    from .database import Measurement
    from .device import DeviceInfo
    from .spec import Workload

    res = load_results(results_path)
    rdir = Path(results_path) if Path(results_path).is_dir() else Path(results_path).parent
    man_p = rdir / "manifest.json"
    man = json.loads(man_p.read_text()) if man_p.exists() else load_manifest(res["bundle"])
    dev = DeviceInfo.from_dict(res["device"])
    if dev.kind not in ("cuda", "cpu") or not dev.units:
        raise ConfigError(f"{results_path}: the results do not describe a GPU (or this host's CPU)")
    db.add_device(dev)
    for w in man["workloads"].values():
        db.add_workload(Workload.from_dict(w))
    cand = {c["id"]: c for c in man["candidates"]}
    added = skipped = 0
    keys = set()
    for m in res["measurements"]:
        c = cand.get(m["candidate"])
        if c is None:
            raise ConfigError(f"{results_path}: measurement of unknown candidate {m['candidate']!r}")
        total = m.get("total_units") or dev.units
        units = m.get("granted_units") or m.get("planned_units")
        meas = Measurement(
            workload_key=m["workload_key"], device_id=dev.id, partition=m["partition"], ratio=m["ratio"],
            interference=m["interference"], mod_hash=c["mod_hash"], trace=c["trace"], status=m["status"],
            error=m.get("error", ""), times=m.get("times") or [], median_s=m.get("median_s"),
            rel_err=m.get("rel_err"), granted_units=units, granted_share=(units / total) if units else None,
            neighbour_throughput=m.get("neighbour_throughput"), neighbour_unit=m.get("neighbour_unit", ""),
            build_s=c.get("build_s"), run_s=m.get("run_s"), search_s=c.get("search_s"),
            features=None if c.get("features") is None else np.asarray(c["features"], dtype=np.float32),
            source="bundle")
        if db.record(meas) is None:
            skipped += 1
        else:
            added += 1
        keys.add((dev.id, m["partition"], m["ratio"], m["interference"]))
    baselines = 0
    for b in res.get("baselines", []):  # the vendor baseline under the same share and neighbour
        if b.get("status") != "ok" or not b.get("median_s"):
            continue
        if b["workload_key"] not in man["workloads"]:
            raise ConfigError(f"{results_path}: baseline of unknown workload {b['workload_key']!r}")
        db.record_baseline(b["workload_key"], dev.id, b["partition"], b["ratio"], b["interference"],
                           b.get("kind") or "cublas", b["median_s"], b.get("granted_units"))
        baselines += 1
    trained = 0
    for device_id, partition, ratio, interference in sorted(keys):
        rows = [r for r in db.measurements(device_id=device_id, partition=partition, ratio=ratio,
                                           interference=interference, status="ok", with_features=True)
                if r.features is not None]
        if len(rows) < 2:
            continue
        model = create_cost_model(cost_model)
        model.fit(np.stack([r.features for r in rows]), [r.median_s for r in rows], [r.workload_key for r in rows])
        db.save_cost_model(device_id, partition, ratio, interference, model.kind, model.to_json(), len(rows))
        trained += 1
    return {"device_id": dev.id, "device": dev.name, "added": added, "skipped": skipped, "keys": len(keys),
            "cost_models": trained, "baselines": baselines}
