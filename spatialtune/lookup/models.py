"""Compiled models for schedulers: which variant to run for the cores just granted.

``spatialtune model export`` writes a directory with one compiled model per share and a
``manifest.json`` (see :mod:`spatialtune.models.export`). :class:`ModelLookup` reads the manifest
(JSON only: no TVM) and answers "the compiled model for the units (or ratio) I was granted" with
the share rule every lookup uses (:func:`.rules.nearest_share`: exact, nearest below, nearest
above, miss), from a dict in memory.

Running a variant needs TVM: :meth:`ModelLookup.load` loads its library and creates its Relax
VM, once; ``preload=True`` does it for every variant up front, so a scheduler that resizes a
tenant swaps variants without loading or compiling anything (:meth:`LoadedVariant.run` only
resizes TVM's thread pool to the variant's thread count, then calls it).

Threads. On a CPU core set a variant was compiled with the kernels tuned for its granted cores,
one thread per core: it runs with exactly that many threads (``threads`` in the manifest),
sharing the cores this process may use. TVM sizes its pool once, when it first starts it; this
module sets ``TVM_NUM_THREADS`` to the largest variant's count before that, if nothing set it,
and a variant that cannot get its threads is refused rather than run with fewer.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError
from ..store.exports import FORMAT, MANIFEST, VERSION
from .model_latency import LatencyAnswer, smallest_share
from .rules import nearest_share

_WHY = {"exact": "compiled for exactly this share",
        "below": "the largest share compiled under it (its threads each get a core)",
        "above": "no share compiled at or under it: the smallest over it (oversubscribes its cores)"}
_SHARE_TO_ALL_CORES = -3  # tvm::runtime::threading::ThreadGroup::kSpecifyThreadShareAllCore


@dataclass(frozen=True)
class ModelVariant:
    ratio: float  # the share's key ratio, percent of the device
    granted_units: int  # cores the share grants
    threads: int  # the thread count it is meant to run with
    file: str  # its library, relative to the export directory
    tuned_tasks: int
    n_tasks: int
    asked: tuple[float, ...]  # the ratios the export was asked for that grant these cores
    tasks: tuple[dict, ...]  # per task: workload key, measurement id, mod_hash, tuned ratio
    latencies: tuple[dict, ...]  # end-to-end runs measured at this share (model_runs)
    compiled: str = "share-tuned"  # whose configs its library has: share-tuned, or whole-tuned when that ran faster


@dataclass(frozen=True)
class ModelAnswer:
    model: str
    found: bool
    match: str  # exact | below | above | miss
    asked_units: int | None
    asked_ratio: float | None
    variant: ModelVariant | None
    path: str | None  # the variant's library
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.variant is not None:
            d["variant"] = {k: v for k, v in d["variant"].items() if k not in ("tasks", "latencies")}
        return d


def read_manifest(directory: str | Path) -> dict:
    """The manifest of an export directory, checked; ConfigError in one line otherwise."""
    d = Path(directory)
    path = d / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{d}: no {MANIFEST} (not a `spatialtune model export` directory)")
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a model manifest ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a model manifest (format is not {FORMAT!r})")
    if m.get("version") != VERSION:
        raise ConfigError(f"{path}: manifest version {m.get('version')!r}, this spatialtune reads {VERSION}")
    try:
        for k in ("name", "hash", "inputs"):
            m["model"][k]
        m["device"]["id"], m["partition"]
        if not isinstance(m["variants"], list):
            raise TypeError("variants is not a list")
        for v in m["variants"]:
            # a bare file name: a manifest may not point a scheduler at a library outside its directory
            if not (isinstance(v["file"], str) and Path(v["file"]).name == v["file"]
                    and int(v["granted_units"]) >= 1 and int(v["threads"]) >= 1 and 0 < float(v["ratio"]) <= 100):
                raise ValueError(v)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: malformed manifest ({type(e).__name__} {str(e)[:80]})") from None
    return m


class ModelLookup:
    """The compiled variants of one exported model. ``lookup`` is thread-safe and TVM-free.

    ``device``: the device id to check the export against (default: this machine's CPU, identified
    once per process as :class:`~.service.Lookup` does, which loads TVM once); ``any_device``: skip the check (a library
    compiled for another CPU model may use instructions this one lacks). ``preload``: load every
    variant's library and VM now. Every variant's file must exist, or ConfigError.
    """

    def __init__(self, directory: str | Path, *, device: str | None = None, any_device: bool = False,
                 preload: bool = False):
        self.dir = Path(directory)
        self.manifest = m = read_manifest(self.dir)
        self.model = m["model"]["name"]
        if not any_device:
            if device is None:
                from .service import this_machine

                device = next(iter(this_machine(["cpu"])), "unknown")
            if device != m["device"]["id"]:
                dev = m["device"]
                raise ConfigError(f"{self.dir}: compiled for device {dev['id']} ({dev.get('name', '?')}, "
                                  f"{dev.get('units', '?')} {dev.get('unit', 'unit')}s), this one is {device}: "
                                  "export it here (or accept it with any_device / --any-device)")
        variants = [ModelVariant(float(v["ratio"]), int(v["granted_units"]), int(v["threads"]), v["file"],
                                 int(v.get("tuned_tasks", 0)), int(v.get("n_tasks", 0)),
                                 tuple(v.get("asked", ())), tuple(v.get("tasks", ())), tuple(v.get("latencies", ())),
                                 str(v.get("compiled", "share-tuned")))
                    for v in m["variants"]]
        for v in variants:
            if not (self.dir / v.file).is_file():
                raise ConfigError(f"{self.dir}: variant {v.ratio:g}% names {v.file}, which is missing")
        self.variants = tuple(sorted(variants, key=lambda v: v.ratio))
        self._by_units = sorted(self.variants, key=lambda v: v.granted_units)
        self._units = [v.granted_units for v in self._by_units]
        self._ratios = [v.ratio for v in self.variants]
        if len(set(self._units)) != len(self._units):
            raise ConfigError(f"{self.dir}/{MANIFEST}: two variants grant the same cores")
        self.cores = tuple(sorted(os.sched_getaffinity(0)))  # before TVM pins this thread
        self._memo: dict[tuple, ModelAnswer] = {}
        self._loaded: dict[str, LoadedVariant] = {}
        self._lock = threading.Lock()
        if preload:
            for v in self.variants:
                self.load(v)

    # -- answers (no TVM) ----------------------------------------------------------------------

    def lookup(self, *, units: int | None = None, ratio: float | None = None) -> ModelAnswer:
        """The variant for a share of ``units`` cores (or ``ratio`` percent). Never raises on a
        miss; ConfigError for a malformed request (neither or both, units < 1, ratio outside (0, 100])."""
        key = (units, ratio)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        if (units is None) == (ratio is None):
            raise ConfigError("model lookup: give exactly one of units (cores) or ratio (percent)")
        if units is not None and (isinstance(units, bool) or not isinstance(units, int) or units < 1):
            raise ConfigError(f"model lookup: units must be a positive integer, got {units!r}")
        if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio <= 100):
            raise ConfigError(f"model lookup: ratio must be a percentage in (0, 100], got {ratio!r}")
        if units is not None:
            i, match = nearest_share(self._units, units)
            v = self._by_units[i] if i >= 0 else None
        else:
            i, match = nearest_share(self._ratios, float(ratio))
            v = self.variants[i] if i >= 0 else None
        if v is None:  # an empty export
            res = ModelAnswer(self.model, False, "miss", units, ratio, None, None, "the export holds no variant")
        else:
            res = ModelAnswer(self.model, True, match, units, ratio, v, str(self.dir / v.file), _WHY[match])
        if len(self._memo) < 4096:
            self._memo[key] = res
        return res

    def share_for_latency(self, latency_ms: float, interference: str = "none") -> LatencyAnswer:
        """The smallest exported share whose measured latency (of the compile it ships, recorded
        in the manifest from ``model_runs``) meets ``latency_ms`` under ``interference``."""
        rows = [dict(lat, ratio=v.ratio, granted_units=v.granted_units) for v in self.variants
                for lat in v.latencies if lat.get("variant") == v.compiled]
        return smallest_share(self.model, rows, latency_ms, interference)

    # -- running (TVM) -------------------------------------------------------------------------

    def load(self, which: ModelAnswer | ModelVariant) -> "LoadedVariant":
        """The variant's library loaded and its VM created (once; later calls return it)."""
        v = which.variant if isinstance(which, ModelAnswer) else which
        if v is None:
            raise ConfigError(f"model {self.model}: nothing to load ({which.reason})")
        lv = self._loaded.get(v.file)
        if lv is None:
            with self._lock:
                lv = self._loaded.get(v.file)
                if lv is None:
                    os.environ.setdefault("TVM_NUM_THREADS", str(max(x.threads for x in self.variants)))
                    lv = self._loaded[v.file] = LoadedVariant(v, str(self.dir / v.file), self.cores)
        return lv

    def close(self) -> None:
        self._loaded.clear()

    def __enter__(self) -> "ModelLookup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LoadedVariant:
    """One variant's Relax VM on the CPU, ready to run with its thread count."""

    def __init__(self, variant: ModelVariant, path: str, cores: Sequence[int]):
        import tvm
        from tvm import relax

        self.variant, self.path, self.cores = variant, path, [str(c) for c in cores]
        self.dev = tvm.cpu(0)
        try:
            self.vm = relax.VirtualMachine(tvm.runtime.load_module(path), self.dev)
        except Exception as e:  # a truncated or foreign library: TVM's message, on one line
            first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{path}: cannot load the compiled model ({first})") from None
        self.main = self.vm["main"]
        self._tvm = tvm

    def activate(self) -> int:
        """Size TVM's pool to this variant's threads over this process's cores; returns it."""
        get = self._tvm.get_global_func
        get("runtime.config_threadpool")(_SHARE_TO_ALL_CORES, self.variant.threads, self.cores)
        got = int(get("runtime.NumThreads")())
        if got != self.variant.threads:
            raise ConfigError(f"{self.path}: TVM's thread pool gives {got} threads, the variant needs "
                              f"{self.variant.threads}: set TVM_NUM_THREADS to at least {self.variant.threads} "
                              "before TVM starts its pool")
        return got

    def run(self, inputs: Sequence[Any]) -> list:
        """``main`` on ``inputs`` (numpy arrays, in the model's input order): its outputs as numpy."""
        self.activate()
        tvm = self._tvm
        out = self.main(*[tvm.runtime.tensor(x, self.dev) for x in inputs])
        return _flat(out, tvm)


def _flat(out, tvm) -> list:
    if isinstance(out, (tuple, list)) or type(out).__name__ in ("Array", "List", "Tuple"):
        return [x for o in out for x in _flat(o, tvm)]
    return [out.numpy()]
