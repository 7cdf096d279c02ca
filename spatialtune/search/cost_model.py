"""Cost models: predict which candidates will be fast under one share, from program features.

Features are MetaSchedule's per-store features (``PerStoreFeature``: 164 numbers per buffer
store), pooled per candidate into a fixed-length vector (sum, mean and max over stores, plus the
store count), so one model can serve every workload. To that the share is appended (the fraction
of the device and log2 of the units granted): one model is kept per (device, partition, ratio,
interference), but it learns from the other shares of the device too, with the share as a
feature, so a new share starts from what the others learned (:mod:`spatialtune.search.policy`
assembles the training set).

Each (workload, share) is its own ranking group: scores order the candidates of one workload
under one share, which is all the search asks of them. Two outputs:

- ``predict``: a margin, higher meaning faster, for ordering;
- ``score``: the margin mapped to a *predicted relative throughput* in (0, 1] (isotonic
  regression of ``best time / time`` on the margin over the training rows). MetaSchedule's
  evolution picks parents in proportion to this score and keeps the highest-scoring candidates
  across its iterations, so it must be positive, comparable between calls and increasing with
  predicted speed. Before any fit a model scores at random: an untrained model explores.

Models are stored in the database in XGBoost's own JSON format.
"""

from __future__ import annotations

import json
import logging
import math
import os
from abc import ABC, abstractmethod
from collections import defaultdict
from typing import Sequence

import numpy as np

from ..errors import ConfigError

log = logging.getLogger(__name__)

N_PER_STORE = 164
N_FEATURES = 3 * N_PER_STORE + 1  # what is stored per measurement
N_SHARE_FEATURES = 2


def pool_features(per_store: np.ndarray) -> np.ndarray:
    """(n_stores, 164) -> fixed-length vector."""
    x = np.asarray(per_store, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        return np.zeros(N_FEATURES, dtype=np.float32)
    return np.concatenate([x.sum(0), x.mean(0), x.max(0), [float(x.shape[0])]]).astype(np.float32)


def with_share(features: np.ndarray, units: int, total: int) -> np.ndarray:
    """Stored features plus the share they are for (rows of ``features``, one share)."""
    x = np.asarray(features, dtype=np.float32)
    x = x.reshape(1, -1) if x.ndim == 1 else x
    extra = np.tile(np.asarray([units / max(1, total), math.log2(max(1, units))], dtype=np.float32), (len(x), 1))
    return np.concatenate([x, extra], axis=1)


def relative_throughput(times: Sequence[float], groups: Sequence[str]) -> np.ndarray:
    """best/time per group: 1 for a group's fastest, toward 0 for slow ones."""
    t = np.asarray(times, dtype=np.float64)
    out = np.zeros_like(t)
    by: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        by[g].append(i)
    for idx in by.values():
        out[idx] = t[idx].min() / t[idx]
    return out


def isotonic(x: np.ndarray, y: np.ndarray, knots: int = 64) -> tuple[list[float], list[float]]:
    """A non-decreasing fit of y on x (pool adjacent violators), as at most ``knots`` points."""
    order = np.argsort(x, kind="stable")
    xs, ys = np.asarray(x, dtype=np.float64)[order], np.asarray(y, dtype=np.float64)[order]
    vals, wts, ends = [], [], []
    for i, v in enumerate(ys):
        vals.append(v)
        wts.append(1.0)
        ends.append(i)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            w = wts[-2] + wts[-1]
            vals[-2] = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / w
            wts[-2] = w
            ends[-2] = ends[-1]
            del vals[-1], wts[-1], ends[-1]
    fit = np.empty_like(ys)
    start = 0
    for v, e in zip(vals, ends):
        fit[start:e + 1] = v
        start = e + 1
    pick = np.unique(np.linspace(0, len(xs) - 1, min(knots, len(xs))).round().astype(int))
    return [float(v) for v in xs[pick]], [float(v) for v in fit[pick]]


class CostModel(ABC):
    """Contract: ``fit`` replaces what was learned with a model of all the data given; ``predict``
    returns one margin per row, higher meaning faster; ``score`` returns positive scores
    comparable across calls (see the module doc), random before any fit. ``to_json`` /
    ``from_json`` round-trip everything learned. Rows carry the share features
    (:func:`with_share`)."""

    kind: str = ""

    def __init__(self, *, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    @abstractmethod
    def fit(self, features: np.ndarray, times: Sequence[float], groups: Sequence[str],
            group_weight: dict[str, float] | None = None) -> None: ...

    @abstractmethod
    def predict(self, features: np.ndarray) -> np.ndarray: ...

    @property
    def trained(self) -> bool:
        return False

    def score(self, features: np.ndarray) -> np.ndarray:
        return self.rng.uniform(0.05, 1.0, len(features))

    @property
    def n_samples(self) -> int:
        return 0

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind})

    @classmethod
    def from_json(cls, text: str) -> "CostModel":
        d = json.loads(text)
        return create_cost_model(d.get("kind", ""), state=d)


class RandomModel(CostModel):
    """Uniform random scores: the baseline a learned model has to beat."""

    kind = "random"

    def __init__(self, seed: int = 0, state: dict | None = None):
        super().__init__(seed=seed)

    def fit(self, features, times, groups, group_weight=None) -> None:
        pass

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.rng.random(len(features))


class XGBModel(CostModel):
    """Gradient-boosted trees (xgboost-cpu) on pooled per-store features and the share, trained
    to *rank*.

    The objective is pairwise ranking within each (workload, share) group: the search only needs
    the order of candidates, and on tens of noisy measurements a ranking objective generalised
    clearly better than regressing normalised throughput (held-out Spearman 0.39 vs 0.18 and
    0.68 vs 0.51 on two CPU data sets here). The margin is then calibrated to predicted relative
    throughput for the evolution (``score``).
    """

    kind = "xgb"

    def __init__(self, *, num_rounds: int = 100, max_depth: int = 4, eta: float = 0.1, state: dict | None = None,
                 seed: int = 0):
        super().__init__(seed=seed)
        self.num_rounds, self.max_depth, self.eta, self.seed = num_rounds, max_depth, eta, seed
        self._booster = None
        self._n = 0
        self._calib: tuple[list[float], list[float]] | None = None
        self._spread = (0.0, 1.0)
        if state and state.get("booster"):
            xgb = _xgb()
            booster = xgb.Booster()
            booster.load_model(bytearray(state["booster"].encode()))
            # a model of another feature layout (saved before the share features) is not used:
            # the caller retrains from the measurements
            if booster.num_features() == N_FEATURES + N_SHARE_FEATURES and state.get("calibration"):
                self._booster = booster
                self._n = int(state.get("n_samples", 0))
                self._calib = tuple(state["calibration"])
                self._spread = tuple(state.get("spread", (0.0, 1.0)))

    @property
    def n_samples(self) -> int:
        return self._n

    @property
    def trained(self) -> bool:
        return self._booster is not None

    def fit(self, features, times, groups, group_weight=None) -> None:
        x = np.asarray(features, dtype=np.float32)
        if len(x) < 2:
            return
        xgb = _xgb()
        g = np.asarray(groups)
        order = np.argsort(g, kind="stable")  # xgboost wants each query group contiguous
        x, g = x[order], g[order]
        t = np.asarray(times, dtype=np.float64)[order]
        rel = relative_throughput(t, list(g))
        dm = xgb.DMatrix(x, label=np.log(rel))  # 0 for a group's best, below 0 for slower
        names, counts = np.unique(g, return_counts=True)
        dm.set_group(counts)
        if group_weight:
            dm.set_weight(np.asarray([group_weight.get(str(n), 1.0) for n in names], dtype=np.float32))
        params = {"objective": "rank:pairwise", "max_depth": self.max_depth, "eta": self.eta, "min_child_weight": 1,
                  "nthread": max(1, len(os.sched_getaffinity(0))), "seed": self.seed, "verbosity": 0}
        self._booster = xgb.train(params, dm, num_boost_round=self.num_rounds)
        self._n = len(x)
        margin = self._booster.predict(xgb.DMatrix(x))
        self._calib = isotonic(margin, rel)
        self._spread = (float(np.mean(margin)), float(np.std(margin)) or 1.0)

    def predict(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float32)
        if self._booster is None:
            return self.rng.random(len(x))
        return self._booster.predict(_xgb().DMatrix(x))

    def score(self, features: np.ndarray) -> np.ndarray:
        if self._booster is None or self._calib is None:
            return super().score(features)
        m = self.predict(features)
        xs, ys = self._calib
        iso = np.interp(m, xs, ys)
        # a strictly increasing tie-breaker: the isotonic fit is flat above its last knot, and the
        # evolution's heap of best candidates needs an order there too
        mu, sd = self._spread
        tie = 1.0 / (1.0 + np.exp(-(m - mu) / sd))
        return np.clip(0.97 * iso + 0.03 * tie, 1e-3, 1.0)

    def to_json(self) -> str:
        raw = None if self._booster is None else bytes(self._booster.save_raw("json")).decode()
        return json.dumps({"kind": self.kind, "n_samples": self._n, "booster": raw,
                           "calibration": list(self._calib) if self._calib else None, "spread": list(self._spread)})


def _xgb():
    try:
        import xgboost
    except ImportError:
        raise ConfigError("the xgb cost model needs xgboost: pip install xgboost-cpu") from None
    return xgboost


COST_MODELS = {"xgb": XGBModel, "random": RandomModel}


def create_cost_model(kind: str | CostModel, **kwargs) -> CostModel:
    if isinstance(kind, CostModel):
        return kind
    try:
        cls = COST_MODELS[kind]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown cost model {kind!r} (known: {', '.join(COST_MODELS)})") from None
    return cls(**kwargs)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    r = spearmanr(a, b).statistic
    return float(r) if np.isfinite(r) else 0.0
