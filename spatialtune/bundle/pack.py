"""Pack a GPU round into a bundle (CPU host, full TVM): the deferred runner ``tune`` measures into.

A round is ``tune`` with a :class:`BundleRunner`: the one loop walks the workloads and shares,
the one policy chooses each batch (transfers, a search batch per share, the key's winners, the
winners matrix), the builder builds it here with cubins, and the runner packs what it is handed
instead of measuring it: each kernel becomes a candidate of the manifest with every condition it
was handed for (``for``), and every result is ``pending``. Nothing of a bundle's candidates is
in the database until ``bundle import`` records what the GPU host measured (output-checked
there); the same round made again then continues from those measurements.
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
from ..measure.runner import MeasureResult, ResultFn, Runner, RunInput
from ..partitions import Partition
from ..partitions.remote import RemotePartition
from ..terms import Condition, Share
from ..workloads.spec import Workload
from . import FORMAT
from .manifest import write_json

log = logging.getLogger(__name__)

# When one kernel is handed over in several roles, the role the run keeps measuring past
# ``--top`` names it (a transfer before a re-measured winner before anything else).
_RANK = {"transfer": 0, "best": 1}


class BundleRunner(Runner):
    """A deferred runner: ``run`` packs the built kernels into the bundle at ``out`` and returns
    ``pending`` results. ``manifest.json`` is rewritten after every batch (a round cut short
    leaves a bundle of what it packed); :meth:`close` adds what a GPU run needs besides the
    kernels and writes it for the last time.

    ``device``: the GPU (or this host's CPU) the bundle is for; ``partition``: the kind of share
    ``tune`` grants (set it before each ``tune`` call of a round that walks several).
    ``origin``: what the round continues from (the database and device), kept in the manifest.
    """

    real = True  # the results come from the hardware, later
    deferred = True
    baselines = False  # ``bundle run`` measures the vendor library beside the kernels itself

    def __init__(self, out: str | Path, device: DeviceInfo, partition: str, *, space: str = "", seed: int = 0,
                 origin: dict | None = None):
        self.out, self.device, self.partition = Path(out), device, partition
        if (self.out / "manifest.json").exists():
            shutil.rmtree(self.out / "kernels", ignore_errors=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "space": str(space), "target": target_for(device), "arch": device.arch,
                         "tvm_version": tvm_version(), "seed": seed, "workloads": {}, "candidates": []}
        if origin:
            self.manifest["round"] = origin
        self._entries: dict[tuple[str, str], dict] = {}  # (workload key, mod hash) -> manifest candidate
        self._t0 = time.perf_counter()
        self._closed = False

    def measures_on(self) -> tuple[DeviceInfo, Partition]:
        return self.device, RemotePartition(self.partition, self.device)

    def run(self, share: Share, interference: str, inputs: Sequence[RunInput],
            on_result: ResultFn | None = None) -> list[MeasureResult]:
        out = []
        for i, item in enumerate(inputs):
            if item.candidate is None:  # nothing to record the result with when it comes back
                raise ConfigError("a bundle packs candidates with their trace and features (RunInput.candidate)")
            self._pack(item, Condition(share.partition_kind, share.key_ratio, str(interference)))
            out.append(MeasureResult(status="pending"))
            if on_result is not None:
                on_result(i, out[-1])
        self._save()
        return out

    def _pack(self, item: RunInput, cond: Condition) -> None:
        wkey = self._workload(item.workload)
        entry = self._entries.get((wkey, item.mod_hash))
        if entry is None:
            index = sum(1 for k in self._entries if k[0] == wkey)
            entry = {"id": f"{wkey}/{index}", "index": index, "workload_key": wkey, "mod_hash": item.mod_hash,
                     **item.candidate, "shares": [], "for": [], "status": "ok", "error": "",
                     "artifact": self._copy(item.artifact, wkey, item.mod_hash, ".so"),
                     "cubin": self._copy(item.cubin, wkey, item.mod_hash, ".cubin")}
            self._entries[wkey, item.mod_hash] = entry
            self.manifest["candidates"].append(entry)
        elif _RANK.get(item.candidate["source"], 2) < _RANK.get(entry["source"], 2):
            entry["source"] = item.candidate["source"]
        if cond.to_json() not in entry["for"]:
            entry["for"].append(cond.to_json())
            entry["shares"].append(share_label(cond, self.device.units))

    def _workload(self, spec: dict) -> str:
        w = Workload.from_dict(spec)
        if w.key not in self.manifest["workloads"]:
            self.manifest["workloads"][w.key] = w.to_dict() | {"key": w.key, "flops": w.flops}
            if w.prim is not None:
                # The run host may have no compiler: a PrimFunc's float64 reference is built here.
                self.manifest["workloads"][w.key]["reference_lib"] = _reference_lib(w, self.out)
        return w.key

    def _copy(self, path: str | None, wkey: str, mod_hash: str, suffix: str) -> str | None:
        if not path:
            return None
        dst = self.out / "kernels" / wkey / f"{mod_hash}{suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst)
        if os.path.exists(path + ".json"):  # a cubin's key: the sha256 of the source it was compiled from
            shutil.copyfile(path + ".json", str(dst) + ".json")
        return os.path.relpath(dst, self.out)

    def _save(self) -> None:
        self.manifest["build_s"] = round(time.perf_counter() - self._t0, 1)
        write_json(self.out / "manifest.json", self.manifest)

    def close(self) -> None:
        """Finish the bundle (for a GPU: the neighbour kernels and the green-context shim); a
        round that packed nothing leaves no manifest."""
        if self.manifest["candidates"] and not self._closed:
            if self.device.kind == "cuda":
                _build_support(self.out, self.device.arch, self.manifest)
            self._save()
        self._closed = True


def share_label(cond: Condition, units: int) -> str:
    """A condition as ``bundle run --condition`` takes it (green shares in SMs, of ``units``)."""
    ratio = cond.ratio
    if cond.partition_kind == "green" and units > 1 and ratio < 100:
        sms = ratio * units / 100.0
        if abs(sms - round(sms)) < 0.01:
            cond = Condition(cond.partition_kind, interference=cond.interference, sms=round(sms))
    return cond.label


def bundle_device(target: str, arch: str | None, dev: dict | None) -> DeviceInfo:
    """The device the bundle compiles for: this host's CPU, or a GPU named by ``--arch`` or by the
    database's device (its compute capability)."""
    if target not in ("cuda", "cpu"):
        raise ConfigError(f"bundle target must be cuda (or cpu, to exercise the loop on this host), got {target!r}")
    if dev is not None:
        if arch and dev.get("arch") and dev["arch"] != arch:
            raise ConfigError(f"device {dev['id']} ({dev['name']}) is {dev['arch']}, the bundle would be {arch}: "
                              f"pass --arch {dev['arch']}")
        return DeviceInfo.from_dict(dev | {"arch": arch or dev.get("arch") or ""})
    if target == "cpu":
        return detect_cpu()
    if not arch:
        raise ConfigError("--arch is needed for a first CUDA round: this host has no GPU to ask and there is no "
                          "--db device (e.g. --arch sm_90 for an H100 or H200)")
    return DeviceInfo(kind="cuda", name="", units=1, unit="SM", arch=arch)


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
