"""The cost models of a job: one per share, each trained on every share of its condition (the
share is a feature), saved in the database with the number of rows it learned from, so a job
that starts again reuses a model only when nothing was measured since it was fit."""

from __future__ import annotations

import time
from typing import Iterable

from ..search.cost_model import CostModel, create_cost_model
from ..search.policy import TrainingSet, fit_share_model
from ..store.database import TuningDatabase
from ..terms import Condition


class ShareModels:
    """The models of one (device, partition, interference) for the shares a job tunes."""

    def __init__(self, db: TuningDatabase, device, partition: str, opt, stage):
        self.db, self.device, self.partition, self.opt, self.stage = db, device, partition, opt, stage
        self.models: dict[float, CostModel] = {}
        self._data: TrainingSet | None = None

    def data(self) -> TrainingSet:
        if self._data is None:
            self._data = TrainingSet(self.device.units)
            self._data.add_rows(self.db.measurements(device_id=self.device.id, partition=self.partition,
                                                     interference=self.opt.interference, status="ok",
                                                     with_features=True))
        return self._data

    def model_for(self, r: float) -> CostModel:
        """The saved model of share ``r`` when it is of the asked kind and learned from every row
        there is; else one fit now (and saved)."""
        if r not in self.models:
            saved = self.db.load_cost_model(self.device.id, self.partition, r, self.opt.interference)
            model = None
            if saved and saved.kind == self.opt.cost_model:
                model = CostModel.from_json(saved.model)
            if model is None or model.n_samples != len(self.data()):
                model = create_cost_model(self.opt.cost_model, seed=self.opt.seed)
                self.fit(r, model)
            self.models[r] = model
        return self.models[r]

    def fit(self, r: float, model: CostModel) -> None:
        t0 = time.perf_counter()
        po = self.opt.policy()
        if fit_share_model(model, self.data(), r, po.own_share_weight, po.transfer_fade_rows):
            self.db.save_cost_model(self.device.id, self.partition, r, self.opt.interference, model.kind,
                                    model.to_json(), len(self.data()))
        self.stage.add("train", time.perf_counter() - t0)

    def learn(self, r: float, model: CostModel, cands, times, wkey: str, units: int) -> None:
        """Add a batch's times to the training rows and retrain the share's model."""
        data = self.data()
        for c, t in zip(cands, times):
            if t is not None:
                data.add(c.features, t, wkey, r, units)
        self.fit(r, model)


def retrain(db: TuningDatabase, device_id: str, units: int, keys: Iterable[Condition], cost_model: str = "xgb") -> int:
    """Retrain and save the model of every condition in ``keys`` from the device's measurements
    (after an import brought new ones); returns how many were saved."""
    trained = 0
    data: dict[tuple, TrainingSet] = {}
    for partition, ratio, interference in sorted({(k.partition_kind, k.ratio, k.interference) for k in keys}):
        if (partition, interference) not in data:  # every share of a condition learns from all of them
            data[partition, interference] = TrainingSet(units)
            data[partition, interference].add_rows(db.measurements(device_id=device_id, partition=partition,
                                                                   interference=interference, status="ok",
                                                                   with_features=True))
        model = create_cost_model(cost_model)
        if fit_share_model(model, data[partition, interference], ratio):
            db.save_cost_model(device_id, partition, ratio, interference, model.kind, model.to_json(),
                               len(data[partition, interference]))
            trained += 1
    return trained
