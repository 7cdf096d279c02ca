"""One immutable snapshot of a database's best configs, and the rules that pick one for a share.

See :mod:`spatialtune.lookup.service` for the rules and the service around this index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

from ..terms import WHOLE, norm_ratio
from .rules import nearest_share

MATCHES = ("exact", "below", "above", "miss")
VENDOR_KINDS = ("numpy", "cublas", "onnxruntime")  # baselines a scheduler could run instead of a tuned kernel


class LookupResult(NamedTuple):
    """One answer, immutable. ``found`` is False for a miss; the config fields are None then.

    A NamedTuple rather than a frozen dataclass: building one is ~6x cheaper, and an uncached
    lookup builds one.
    """

    workload: str  # what was asked (key or name)
    workload_key: str | None
    requested_ratio: float | None  # percent of the device (None: units that could not be converted)
    requested_interference: str
    match: str  # exact | below | above | miss
    reason: str
    device_id: str | None = None
    partition: str | None = None
    interference: str | None = None  # the condition the config was tuned under
    tuned_ratio: float | None = None
    tuned_units: int | None = None
    median_s: float | None = None  # measured at tuned_ratio under `interference`
    mod_hash: str | None = None
    measurement_id: int | None = None
    n_trials: int | None = None
    updated_at: str | None = None
    requested_units: int | None = None  # cores or SMs granted, when asked by units
    other_device: bool = False  # the config was tuned on another device than the caller's (any_device)
    checked: bool = True  # False: an imported config never run through the output check (include_unchecked)
    prefer: str | None = None  # "vendor" when the vendor library beat the tuned kernel under the same condition
    vendor: str | None = None  # which library (numpy, cublas...), measured where the config was
    vendor_s: float | None = None

    @property
    def found(self) -> bool:
        return self.match != "miss"

    def to_dict(self) -> dict[str, Any]:
        return self._asdict() | {"found": self.found}


@dataclass(frozen=True, slots=True)
class _Entry:
    device_id: str
    partition: str
    ratio: float
    interference: str
    measurement_id: int
    median_s: float
    n_trials: int
    mod_hash: str
    granted_units: int | None
    updated_at: str
    checked: bool


class LookupIndex:
    """One snapshot of a database's best configs. Groups are added once and never change.

    ``here``: the caller's device ids (its CPU, its GPUs), used when a request names no device;
    with ``any_device`` (or ``here`` None) a database of one device answers for it, marked as
    another device's config when it is not one of ``here``."""

    def __init__(self, version: tuple, devices: Mapping[str, int], names: Mapping[str, tuple[str, ...]],
                 unit_names: Mapping[str, str] | None = None, *, device_names: Mapping[str, str] | None = None,
                 here: frozenset[str] | None = None, any_device: bool = False):
        self.version = version
        self.devices = dict(devices)  # device id -> units of the whole device
        self.unit_names = dict(unit_names or {})  # device id -> "core" | "SM"
        self.device_names = dict(device_names or {})  # device id -> model name
        self.here, self.any_device = here, any_device
        self.names = dict(names)  # workload name or key -> keys
        # workload key -> {(device, partition, interference): (ratios ascending, entries, units, by units)}
        self.groups: dict[str, dict[tuple[str, str, str], tuple]] = {}
        self.vendor: dict[str, dict[tuple, tuple[str, float]]] = {}  # key -> {(dev, part, ratio, interf): fastest}
        self.memo: dict[tuple, LookupResult] = {}
        self.devs: dict[str, tuple[str, ...]] = {}
        self.parts: dict[str, dict[str, tuple[str, ...]]] = {}

    def add_rows(self, key: str, rows: list[tuple], vendor_rows: list[tuple] = ()) -> None:
        """``rows``: the best rows of ``key`` (see ``_Reader.best_rows``); ``vendor_rows``:
        (device, partition, ratio, interference, kind, median_s) of its vendor baselines."""
        by: dict[tuple[str, str, str], list[_Entry]] = {}
        for (_, dev, part, ratio, interf, mid, med, n, h, units, upd, status) in rows:
            total = self.devices.get(dev)
            if not units and total:  # an imported row without the units recorded: what the ratio grants
                units = max(1, round(ratio * total / 100.0))
            by.setdefault((dev, part, interf), []).append(
                _Entry(dev, part, norm_ratio(ratio), interf, mid, med, n, h, units, upd, status == "ok"))
        group = {}
        for k, es in by.items():
            es.sort(key=lambda e: e.ratio)
            by_units = sorted(es, key=lambda e: (e.granted_units or 0, e.ratio))
            group[k] = (tuple(e.ratio for e in es), tuple(es), tuple(e.granted_units or 0 for e in by_units),
                        tuple(by_units))
        fastest: dict[tuple, tuple[str, float]] = {}
        for dev, part, ratio, interf, kind, med in vendor_rows:
            k = (dev, part, norm_ratio(ratio), interf)
            if kind in VENDOR_KINDS and med and (k not in fastest or med < fastest[k][1]):
                fastest[k] = (kind, med)
        self.vendor[key] = fastest
        self.groups[key] = group
        # what resolve() would otherwise recompute on every uncached request
        self.devs[key] = tuple(sorted({d for d, _, _ in group}))
        self.parts[key] = {d: tuple(sorted({p for dd, p, _ in group if dd == d})) for d in self.devs[key]}

    def _named(self, dev: str) -> str:
        name = self.device_names.get(dev)
        return f"{dev} ({name})" if name else dev

    def _device(self, wkey: str, device: str | None) -> tuple[str | None, str, bool]:
        """(device to answer for or None, why not, whether it is not one of the caller's)."""
        devs = self.devs[wkey]
        tuned_on = ", ".join(self._named(d) for d in devs)
        if device is not None:
            if device not in devs:
                return None, f"{wkey} was not tuned on device {device} (tuned on: {tuned_on})", False
            return device, "", self.here is not None and device not in self.here
        if not self.any_device and self.here is not None:
            mine = [d for d in devs if d in self.here]
            if not mine:
                here = (f"this machine is {', '.join(self._named(d) for d in sorted(self.here))}" if self.here
                        else "this machine has no device of the kinds it was tuned on")
                return None, (f"{wkey} was not tuned on this machine ({here}); tuned on: {tuned_on}: "
                              f"pass device or any_device"), False
            if len(mine) > 1:
                return None, f"{wkey} was tuned on several devices of this machine ({', '.join(mine)}): pass device", False
            return mine[0], "", False
        if len(devs) > 1:
            return None, f"{wkey} was tuned on several devices ({tuned_on}): pass device", False
        return devs[0], "", self.here is None or devs[0] not in self.here

    def resolve(self, asked: str, ratio: float | None, interference: str, device: str | None,
                partition: str | None, units: int | None = None) -> LookupResult:
        """The answer for a workload whose group is loaded (pure: no I/O). Exactly one of ``ratio``
        (the percentage the share is keyed by) and ``units`` (cores or SMs granted, compared with
        the units each config's measurements really had) is given. The share rule is
        :func:`.rules.nearest_share`."""
        keys = self.names.get(asked, ())

        def miss(reason: str, wkey: str | None = None) -> LookupResult:
            return LookupResult(asked, wkey, ratio, interference, "miss", reason, requested_units=units)

        if not keys:
            return miss(f"workload {asked!r} is not in the database")
        if len(keys) > 1:
            return miss(f"{asked!r} names several workloads ({', '.join(keys)}): ask by key")
        wkey = keys[0]
        group = self.groups.get(wkey, {})
        if not group:
            return miss(f"{wkey} has no measured config yet", wkey)
        device, why_dev, other = self._device(wkey, device)
        if device is None:
            return miss(why_dev, wkey)
        parts = self.parts[wkey][device]
        if partition is None:
            if len(parts) > 1:
                return miss(f"{wkey} was tuned under several partitions ({', '.join(parts)}): pass partition", wkey)
            partition = parts[0]
        elif partition not in parts:
            return miss(f"{wkey} on {device} was not tuned under partition {partition} "
                        f"(tuned under: {', '.join(parts)})", wkey)
        if units is not None and ratio is None and self.devices.get(device):
            ratio = norm_ratio(min(WHOLE, 100.0 * units / self.devices[device]))
        picks, why_not = self._picks(self.groups[wkey], device, partition, interference, ratio, units)
        if not picks:
            return miss(f"{wkey} on {device}: {'; '.join(why_not)}", wkey)
        _, cond, e, match, why = min(picks, key=lambda p: p[0])  # stable: the requested condition first
        if cond != interference:
            skipped = [w for w in why_not if f"{interference!r}" in w]
            why = f"{'; '.join(skipped)}, using 'none': {why}"
        if other:
            why += f"; a config of device {self._named(device)}, not of this machine"
        if not e.checked:
            why += "; an imported config never output-checked here"
        vendor, vendor_s = self.vendor.get(wkey, {}).get((device, partition, e.ratio, e.interference), (None, None))
        prefer = None
        if vendor_s is not None and vendor_s < e.median_s:
            prefer = "vendor"
            why += f"; {vendor} measured faster there ({vendor_s * 1e6:.4g} us vs {e.median_s * 1e6:.4g} us)"
        return LookupResult(asked, wkey, ratio, interference, match, why, e.device_id, e.partition,
                            e.interference, e.ratio, e.granted_units, e.median_s, e.mod_hash, e.measurement_id,
                            e.n_trials, e.updated_at, units, other, e.checked, prefer, vendor, vendor_s)

    def _picks(self, group: dict, device: str, partition: str, interference: str, ratio: float | None,
               units: int | None) -> tuple[list[tuple], list[str]]:
        """The share rule's pick under the requested condition and under ``none`` ((above?,
        condition, entry, match, why) each), and why a condition gave nothing at or below the share.
        A share at or below the granted one under ``none`` comes before one above under the
        neighbour's: an oversubscribed core set costs more than a neighbour the kernel was not
        tuned next to."""
        conds = [interference] if interference == "none" else [interference, "none"]
        picks, why_not = [], []
        for cond in conds:
            hit = group.get((device, partition, cond))
            if hit is None:
                why_not.append(f"nothing tuned under interference {cond!r}")
                continue
            ratios, entries, unit_list, by_units = hit
            if units is not None:
                unit = self.unit_names.get(device, "unit")
                x, xs, es, fmt = units, unit_list, by_units, (lambda v, u=unit: f"{v} {u}{'s' if v != 1 else ''}")
            else:
                x, xs, es, fmt = ratio, ratios, entries, (lambda v: f"{v:g}%")
            i, match = nearest_share(xs, x)
            why = {"exact": f"tuned for exactly {fmt(x)}",
                   "below": f"nearest tuned share below {fmt(x)} is {fmt(xs[i])}",
                   "above": f"no share at or below {fmt(x)} was tuned; nearest above is {fmt(xs[i])}"}[match]
            picks.append((match == "above", cond, es[i], match, why))
            if match == "above":
                why_not.append(f"under {cond!r} no share at or below {fmt(x)}")
        return picks, why_not
