"""Cost models: predict which candidates will be fast under one share, from program features.

Features are MetaSchedule's per-store features (``PerStoreFeature``: 164 numbers per buffer
store), pooled per candidate into a fixed-length vector (sum, mean and max over stores, plus the
store count), so one model can serve every workload of a share. Each workload is its own
ranking group: scores order the candidates of one workload, which is all the search asks of
them. One model per (device, partition, ratio, interference), retrained as measurements arrive
and stored in the database in XGBoost's own JSON format.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections import defaultdict
from typing import Sequence

import numpy as np

from .errors import ConfigError

log = logging.getLogger(__name__)

N_PER_STORE = 164
N_FEATURES = 3 * N_PER_STORE + 1


def pool_features(per_store: np.ndarray) -> np.ndarray:
    """(n_stores, 164) -> fixed-length vector."""
    x = np.asarray(per_store, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        return np.zeros(N_FEATURES, dtype=np.float32)
    return np.concatenate([x.sum(0), x.mean(0), x.max(0), [float(x.shape[0])]]).astype(np.float32)


def normalised_scores(times: Sequence[float], groups: Sequence[str]) -> np.ndarray:
    """best/time per group: 1 for a group's fastest, toward 0 for slow ones."""
    t = np.asarray(times, dtype=np.float64)
    out = np.zeros_like(t)
    by: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        by[g].append(i)
    for idx in by.values():
        out[idx] = t[idx].min() / t[idx]
    return out


class CostModel(ABC):
    """Contract: ``fit`` replaces what was learned with a model of all the data given; ``predict``
    returns one score per row, higher meaning faster, and works (uninformed) before any fit.
    ``to_json``/``from_json`` round-trip everything learned."""

    kind: str = ""

    @abstractmethod
    def fit(self, features: np.ndarray, times: Sequence[float], groups: Sequence[str]) -> None: ...

    @abstractmethod
    def predict(self, features: np.ndarray) -> np.ndarray: ...

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
        self.rng = np.random.default_rng(seed)

    def fit(self, features, times, groups) -> None:
        pass

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.rng.random(len(features))


class XGBModel(CostModel):
    """Gradient-boosted trees (xgboost-cpu) on pooled per-store features, trained to *rank*.

    The objective is pairwise ranking within each workload (``rank:pairwise``, one query group
    per workload): the search only needs the order of candidates, and on tens of noisy
    measurements a ranking objective generalised clearly better than regressing normalised
    throughput (held-out Spearman 0.39 vs 0.18 and 0.68 vs 0.51 on two CPU data sets here).
    """

    kind = "xgb"

    def __init__(self, *, num_rounds: int = 100, max_depth: int = 4, eta: float = 0.1, state: dict | None = None,
                 seed: int = 0):
        self.num_rounds, self.max_depth, self.eta, self.seed = num_rounds, max_depth, eta, seed
        self._booster = None
        self._n = 0
        if state and state.get("booster"):
            xgb = _xgb()
            self._booster = xgb.Booster()
            self._booster.load_model(bytearray(state["booster"].encode()))
            self._n = int(state.get("n_samples", 0))

    @property
    def n_samples(self) -> int:
        return self._n

    def fit(self, features, times, groups) -> None:
        x = np.asarray(features, dtype=np.float32)
        if len(x) < 2:
            return
        xgb = _xgb()
        g = np.asarray(groups)
        order = np.argsort(g, kind="stable")  # xgboost wants each query group contiguous
        x, g = x[order], g[order]
        t = np.asarray(times, dtype=np.float64)[order]
        relevance = np.log(normalised_scores(t, list(g)))  # 0 for a workload's best, below 0 for slower
        dm = xgb.DMatrix(x, label=relevance)
        dm.set_group(np.unique(g, return_counts=True)[1])
        params = {"objective": "rank:pairwise", "max_depth": self.max_depth, "eta": self.eta, "min_child_weight": 1,
                  "nthread": 1, "seed": self.seed, "verbosity": 0}
        self._booster = xgb.train(params, dm, num_boost_round=self.num_rounds)
        self._n = len(x)

    def predict(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float32)
        if self._booster is None:
            return np.zeros(len(x))
        return self._booster.predict(_xgb().DMatrix(x))

    def to_json(self) -> str:
        raw = None if self._booster is None else bytes(self._booster.save_raw("json")).decode()
        return json.dumps({"kind": self.kind, "n_samples": self._n, "booster": raw})


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
    except KeyError:
        raise ConfigError(f"unknown cost model {kind!r} (known: {', '.join(COST_MODELS)})") from None
    return cls(**kwargs)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    r = spearmanr(a, b).statistic
    return float(r) if np.isfinite(r) else 0.0
