"""The one policy that picks the next candidates for a (workload, condition): used by ``tune``
batch by batch, whether a batch is measured here, on RPC servers or later on a GPU host (a
bundle).

For a tuning key (workload, device, partition, ratio, interference) it starts from everything the
database holds for that workload on that device:

1. **Transfers** (measured first, before any search): the configs that are best elsewhere, so every
   comparison the report makes is measured under this condition. The ``transfer_top`` best of
   each other share under the same neighbour; the best config of each other neighbour at this
   share; and the whole-device quiet config (100 %, no neighbour), the one an ordinary tuner
   would hand out.
2. **Seeds**: the ``seeds_per_share`` best configs of each other condition of the partition
   become parents of the evolution, their times put on this share's scale first (each divided by
   its own share's best time, times this share's best): at a small share, the whole-device winners
   must not crowd out what this share measured itself.
3. **Search**: :class:`~.evolution.EvolutionarySearch` ranked by this share's cost model, which
   is trained on every share of the device with the share as a feature (this share's groups
   weighted ``own_share_weight``), so a new share starts from what the others learned. What the
   others learned fades as this share measures the workload itself (``transfer_fade_rows``): the
   best tiling for one core is not the best for two, and a model still led by the whole device's
   ranking kept the search near the whole-device winners (at 50 % on 1 core a search from scratch
   ended faster than one with transfer on all three workloads of ``scripts/bench-search``). A
   fraction of every batch is drawn uniformly from the design space.

Nothing already measured under the key is ever proposed again.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from ..terms import WHOLE, Condition, norm_ratio
from .cost_model import CostModel, with_share
from .evolution import EvolutionarySearch, EvolutionConfig, SearchRun
from .space import Candidate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PolicyOptions:
    cost_model: str = "xgb"
    transfer_top: int = 2  # configs measured here from each other share
    matrix_top: int = 3  # each condition's fastest kernels measured under every other (missing_winners)
    seeds_per_share: int = 16  # parents taken from each other share
    own_share_weight: float = 3.0
    transfer_fade_rows: float = 32.0  # another share's rows weigh 1 / (1 + own rows / this)
    sibling_top: int = 2  # configs measured here from each sibling task under the same key (.siblings)
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)


# ---------------------------------------------------------------- cost models


@dataclass
class TrainingSet:
    """Measured rows of one (device, partition, interference), every workload and share: the
    data every share's model of that condition learns from."""

    total_units: int
    features: list[np.ndarray] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # workload@ratio
    ratios: list[float] = field(default_factory=list)

    def add(self, features, time_s: float, workload_key: str, ratio: float, units: int | None) -> None:
        if features is None or time_s is None:
            return
        self.features.append(with_share(features, units or self.total_units, self.total_units)[0])
        self.times.append(float(time_s))
        self.groups.append(f"{workload_key}@{norm_ratio(ratio):g}")
        self.ratios.append(norm_ratio(ratio))

    def add_rows(self, rows) -> None:
        for m in rows:
            if m.status == "ok":
                self.add(m.features, m.median_s, m.workload_key, m.ratio, m.granted_units)

    def __len__(self) -> int:
        return len(self.times)


def fit_share_model(model: CostModel, data: TrainingSet, ratio: float,
                    own_share_weight: float = PolicyOptions.own_share_weight,
                    transfer_fade_rows: float = PolicyOptions.transfer_fade_rows) -> bool:
    """Fit ``model`` (for share ``ratio``) on ``data``; returns whether it was fit.

    A group of this share weighs ``own_share_weight``; a group of another share weighs
    ``1 / (1 + n / transfer_fade_rows)``, where ``n`` is how many rows the same workload has at
    this share: the other shares lead while this one knows nothing of the workload, and fade once
    it has measured the workload itself (at 32 rows they count a third, at 256 a ninth)."""
    if len(data) < 2:
        return False
    r = norm_ratio(ratio)
    rows = list(zip(data.groups, data.ratios))
    own = Counter(g.rpartition("@")[0] for g, rr in rows if rr == r)  # groups are workload@ratio
    weights = {g: own_share_weight if rr == r else 1.0 / (1.0 + own[g.rpartition("@")[0]] / transfer_fade_rows)
               for g, rr in rows}
    model.fit(np.stack(data.features), data.times, data.groups, group_weight=weights)
    return True


# ---------------------------------------------------------------- configs that belong measured everywhere


def best_by_key(rows: Sequence) -> dict[Condition, list]:
    """The ok measurements of each key, fastest first (keys with none are left out)."""
    out: dict[Condition, list] = {}
    for m in rows:
        if m.status == "ok":
            out.setdefault(Condition.of(m), []).append(m)
    return {k: sorted(v, key=lambda m: m.median_s) for k, v in out.items()}


def comparison_configs(best_of: dict[Condition, list], key: Condition) -> list:
    """The configs whose time under ``key`` the single- vs multi-tenant comparison needs: the one
    an ordinary tuner gives (best at 100 %, no neighbour), and for a neighbour condition the one
    tuned for the same share without it (see :mod:`spatialtune.report.tenancy`)."""
    out = []
    for k in (Condition(key.partition_kind, WHOLE, "none"), Condition(key.partition_kind, key.ratio, "none")):
        if k in best_of and k != key and all(m.mod_hash != best_of[k][0].mod_hash for m in out):
            out.append(best_of[k][0])
    return out


def missing_winners(rows: Sequence, top: int) -> dict[Condition, list]:
    """The winners matrix still to measure: for every key measured in ``rows`` (one workload on
    one device), the ``top`` fastest kernels of every other key of the same partition that were
    never tried under it (the comparison configs are the top-1 of two of those keys, so they are
    always among them). Once every one is measured, a key's best is the fastest kernel measured
    there, whichever condition found it and whichever order the conditions were tuned in.

    Measuring them can change a key's top (a kernel from elsewhere is faster there): call again
    until it returns nothing. That ends, since every kernel it proposes is measured everywhere."""
    best_of = best_by_key(rows)
    seen: dict[Condition, set[str]] = {}
    for m in rows:
        seen.setdefault(Condition.of(m), set()).add(m.mod_hash)
    out = {}
    for k in seen:
        need: dict[str, object] = {}
        for src, ms in sorted(best_of.items(), key=lambda kv: (-kv[0].ratio, kv[0].interference)):
            if src == k or src.partition_kind != k.partition_kind:
                continue
            for m in ms[:max(1, top)]:
                if m.mod_hash not in seen[k]:
                    need.setdefault(m.mod_hash, m)
        if need:
            out[k] = list(need.values())
    return out


@dataclass(frozen=True)
class Origin:
    """Where a key's best kernel was first measured: under the key itself (``own``), or under
    another share, another neighbour or both, and by which step (the row's ``source``:
    ``tune``, ``transfer``, ``matrix``, ``import``...)."""

    kind: str  # own | share | neighbour | share+neighbour
    found_at: Condition
    source: str

    def label(self) -> str:
        k = self.found_at
        if self.kind == "own" and self.source == "sibling":
            return "from a sibling task"
        if self.kind == "own":
            return "own search" if self.source in ("tune", "") else f"own ({self.source})"
        where = "quiet" if k.interference == "none" else f"next to {k.interference}"
        if self.kind == "share":
            return f"from {k.ratio:g}%"
        if self.kind == "neighbour":
            return f"from {where}"
        return f"from {k.ratio:g}% {where}"


def winner_origins(rows: Sequence) -> dict[Condition, Origin]:
    """For every key with an ok measurement in ``rows`` (one workload on one device; any order),
    where its fastest kernel came from: the key under which that kernel was measured first."""
    first: dict[str, object] = {}
    for m in sorted(rows, key=lambda m: (m.id is None, m.id or 0)):
        first.setdefault(m.mod_hash, m)
    out = {}
    for k, ms in best_by_key(rows).items():
        f = first[ms[0].mod_hash]
        at = Condition.of(f)
        if at == k or at.partition_kind != k.partition_kind:
            kind = "own"
        elif at.interference == k.interference:
            kind = "share"
        elif at.ratio == k.ratio:
            kind = "neighbour"
        else:
            kind = "share+neighbour"
        out[k] = Origin(kind, at, f.source if kind == "own" or f.source not in ("tune", "") else "search")
    return out


# ---------------------------------------------------------------- the policy for one key


class SharePolicy:
    """What to measure next for one workload under one condition.

    ``rows``: every measurement of the workload on the device (any key), with features;
    ``share_units``: (units granted, units of the device) for the cost model's share features.
    """

    def __init__(self, workload, target: dict, key: Condition, rows: Sequence, model: CostModel, *,
                 share_units: tuple[int, int], options: PolicyOptions = PolicyOptions(), run: SearchRun = SearchRun()):
        self.workload, self.key, self.options = workload, key, options
        self.here = [m for m in rows if Condition.of(m) == key]
        self.best_of = {k: v for k, v in best_by_key(rows).items() if k != key}
        measured = [(m.trace, m.median_s if m.status == "ok" else None) for m in self.here]
        rs = (run.seed * 7919 + len(self.here) * 31 + zlib.crc32(f"{key.partition_kind}:{key.ratio:g}:{key.interference}"
                                                                  .encode())) % (2**31 - 1)
        t0 = time.perf_counter()
        seeds = self._seeds()
        self.n_seeds = len(seeds)
        self.search = EvolutionarySearch(workload, target, model, measured=measured, seeds=seeds,
                                         config=options.evolution, share_units=share_units,
                                         run=replace(run, seed=rs))
        self.setup_s = time.perf_counter() - t0

    def _seeds(self) -> list[tuple[str, float]]:
        ok_here = [m.median_s for m in self.here if m.status == "ok"]
        scale = min(ok_here) if ok_here else 1.0
        out = []
        for k, ms in self.best_of.items():
            if k.partition_kind != self.key.partition_kind:
                continue
            best = ms[0].median_s
            out += [(m.trace, m.median_s / best * scale) for m in ms[: self.options.seeds_per_share]]
        out.sort(key=lambda s: s[1])
        return out

    def transfer_traces(self) -> list[str]:
        """Traces of the configs best elsewhere that belong measured here (see the module doc):
        the comparison configs first, then the best of the other shares and neighbours."""
        k, top = self.key, self.options.transfer_top
        out = [m.trace for m in comparison_configs(self.best_of, k)]
        for kk, ms in sorted(self.best_of.items(), key=lambda kv: (-kv[0].ratio, kv[0].interference)):
            if kk.partition_kind != k.partition_kind:
                continue
            if kk.interference == k.interference:
                out += [m.trace for m in ms[:top]]  # other shares, same neighbour
            elif kk.ratio == k.ratio:
                out += [m.trace for m in ms[:1]]  # this share, other neighbours
        return list(dict.fromkeys(out))

    def transfers(self, siblings: Sequence[tuple] = ()) -> list[Candidate]:
        """What to measure before any search: the transfers, then the kernels of ``siblings``
        ((workload, traces): other tasks' best kernels under this key, :mod:`.siblings`)."""
        out = self.search.replayed(self.transfer_traces(), "transfer")
        return out + self.sibling_kernels(siblings, exclude={c.mod_hash for c in out})

    def sibling_kernels(self, siblings: Sequence[tuple], exclude: set[str] = frozenset()) -> list[Candidate]:
        """Sibling tasks' best kernels under this key, adapted to this workload (:mod:`.siblings`)."""
        from ..workloads.schedule import mod_hash
        from .siblings import adapt

        space, out, taken = self.search.space, [], set(exclude)
        for donor, traces in siblings:
            for tr in traces:
                sch = adapt(space, donor, tr)
                h = None if sch is None else mod_hash(sch.mod)
                if h is not None and h not in taken and h not in self.search.measured:
                    taken.add(h)
                    out.append(space.candidate(sch, "sibling"))
        return out

    def ask(self, n: int) -> list[Candidate]:
        return self.search.ask(n)

    def tell(self, candidates: Sequence[Candidate], times: Sequence[float | None]) -> None:
        self.search.tell(candidates, times)

    def close(self) -> None:
        self.search.close()
