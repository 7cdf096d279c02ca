"""The vocabulary, defined once and used everywhere.

- **ratio**: what was *asked*, a percentage of the device in (0, 100] (``--ratios 25,50,100``).
- **share**: what a partition *granted* for a ratio: a number of units of one kind (cores or
  SMs) out of the device's total, and the fraction that makes (:class:`Share`).
- **partition**: the mechanism that grants and enforces a share (``cpu`` core sets, ``mps``
  thread percentages, ``green`` contexts); see :mod:`spatialtune.partitions`.
- **neighbour** (interference): what runs on the rest of the device meanwhile (``none``,
  ``compute``, ``memory``, ``tenant:WORKLOAD``); see :mod:`spatialtune.neighbours`.
- **condition**: a share plus a neighbour, the thing a measurement is valid for, and a tuning
  key less its workload and device (:class:`Condition`, written ``mps:25``, ``green:32sm``,
  ``cpu:50:memory``).
- **batch**: the candidates ``tune`` builds and hands to its runner at once; every measured
  batch, whichever runner measured it, goes through the same **after-batch steps** (record the
  rows, retrain the share's cost model, report progress; ``tuning.after_batch``).
- **regret**: a time ratio, :func:`regret`; >= 1 means the config from elsewhere is slower than
  the config tuned here.

This module imports nothing heavy: a runtime-only GPU host and the lookup library use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import ConfigError

WHOLE = 100.0


def check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0 < ratio <= 100):
        raise ConfigError(f"ratio must be a percentage in (0, 100], got {ratio!r}")
    return float(ratio)


def norm_ratio(ratio: float) -> float:
    """Ratios are percentages stored as REAL; round so 100/8 and 12.5 are one key."""
    return round(float(ratio), 4)


def parse_ratios(text: str) -> list[float]:
    """``"25,50,100"`` -> [100.0, 50.0, 25.0]: descending, so the whole-device config exists
    before the shares that reuse it as a seed and as the comparison."""
    out = []
    for part in str(text).split(","):
        part = part.strip().rstrip("%")
        if not part:
            continue
        try:
            r = float(part)
        except ValueError:
            raise ConfigError(f"--ratios: {part!r} is not a number (expected e.g. 25,50,100)") from None
        check_ratio(r)
        if r not in out:
            out.append(r)
    if not out:
        raise ConfigError("--ratios: no ratio given (expected e.g. 25,50,100)")
    return sorted(out, reverse=True)


@dataclass(frozen=True)
class Share:
    """What a partition granted for a requested ratio.

    ``key_ratio`` is the percentage the database keys measurements by: what the share really
    is. For core sets and green contexts that is the units granted over the device's total (25 %
    of 132 SMs is a 32-SM green context, stored as 24.2424, the same key as ``green:32sm``); for
    MPS it is the active-thread percentage the client ran with, MPS's own cap (the SMs a client
    sees are recorded beside every measurement as ``granted_units``).
    """

    partition_kind: str  # the mechanism: cpu | mps | green
    ratio: float  # what was asked, percent of the device
    units: int  # cores or SMs granted
    total: int  # cores or SMs of the whole device
    unit: str  # "core" | "SM"
    cores: tuple[int, ...] = field(default=())  # CPU: the core ids granted
    exact: bool = True  # units are exactly what the kernels get (core sets, green contexts), not a cap

    @property
    def fraction(self) -> float:
        return self.units / self.total

    @property
    def key_ratio(self) -> float:
        if self.exact:
            return WHOLE if self.units >= self.total else norm_ratio(100.0 * self.units / self.total)
        return norm_ratio(self.ratio)

    def describe(self) -> str:
        return f"{self.ratio:g}% -> {self.units}/{self.total} {self.unit}s"


@dataclass(frozen=True)
class Condition:
    """A share plus a neighbour: what a measurement is valid for, and what a tuning key holds
    besides the workload and the device.

    The one type for it everywhere: the policy's keys, ``tune``'s key columns, a bundle manifest's
    ``for`` and a database row's columns. There the share is the key ratio the database stores
    (:attr:`Share.key_ratio`). Asked for by hand (``--condition green:64sm``) a green context may
    instead be named by its SM count (``sms``), which the partition grants as a ratio.
    """

    partition_kind: str  # mps | green | cpu
    ratio: float | None = None
    interference: str = "none"
    sms: int | None = None

    @property
    def label(self) -> str:
        amount = f"{self.sms}sm" if self.sms is not None else f"{self.ratio:g}%"
        return f"{self.partition_kind}:{amount}" + ("" if self.interference == "none" else f":{self.interference}")

    @classmethod
    def of(cls, row) -> "Condition":
        """The condition of a database row: a measurement (or anything with its ``partition``,
        ``ratio`` and ``interference``), or a dict with those keys (:meth:`to_dict`)."""
        get = row.get if isinstance(row, dict) else (lambda k: getattr(row, k))
        return cls(get("partition"), norm_ratio(get("ratio")), get("interference"))

    from_dict = of

    def to_dict(self) -> dict:
        """The database's columns for it: ``partition``, ``ratio`` (the key ratio), ``interference``."""
        if self.ratio is None:
            raise ConfigError(f"condition {self.label}: no ratio yet (a share named by SMs is keyed once granted)")
        return {"partition": self.partition_kind, "ratio": norm_ratio(self.ratio), "interference": self.interference}

    def to_json(self) -> list:
        """How a bundle manifest writes it (a candidate's ``for``): [partition, ratio, interference]."""
        d = self.to_dict()
        return [d["partition"], d["ratio"], d["interference"]]

    @classmethod
    def from_json(cls, value) -> "Condition":
        """:meth:`to_json`'s list, as every manifest has written it (a dict of the columns too)."""
        if isinstance(value, dict):
            return cls.of(value)
        partition, ratio, interference = value
        return cls(partition, norm_ratio(ratio), interference)


def parse_condition(text: str) -> Condition:
    """``mps:50``, ``green:64sm``, ``green:48.5``, ``mps:50:compute``, ``mps:50:tenant:mm_1024``, ``cpu:50``."""
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


CPU_NEIGHBOURS = ("compute", "memory")
# No co-runner, but every timed run starts with the caches emptied (spatialtune.neighbours.base.ColdCaches).
COLD = "cold"


def check_interference(spec: str) -> str:
    """A neighbour name: ``none``, ``cold``, ``compute``, ``memory`` or ``tenant:WORKLOAD``."""
    if spec in ("none", COLD) + CPU_NEIGHBOURS:
        return spec
    if isinstance(spec, str) and spec.startswith("tenant:") and len(spec) > len("tenant:"):
        return spec
    raise ConfigError(f"unknown interference {spec!r} (known: none, cold, compute, memory, tenant:WORKLOAD)")


def regret(elsewhere_s: float | None, here_s: float | None) -> float | None:
    """The time of a config tuned elsewhere, measured here, over the time of the best config tuned
    here (both under the same condition). >= 1: the config from elsewhere is slower. None when
    either time is missing."""
    if not elsewhere_s or not here_s:
        return None
    return elsewhere_s / here_s


def geomean(values) -> float | None:
    vals = [v for v in values if v]
    if not vals:
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))
