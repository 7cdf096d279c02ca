"""spatialtune: tune TVM kernels for a share of the device and a noisy neighbour.

The library API (the CLI is a thin layer over it)::

    from spatialtune import load_space, TuningDatabase, tune, TuneOptions
    space = load_space("search_spaces/demo.toml")
    with TuningDatabase("tuning_db/spatialtune.sqlite") as db:
        summary = tune(space.select(["dense_small"]), [50, 100], db, TuneOptions(trials=32))

Names are imported lazily: a GPU host that measures bundles has numpy and a runtime-only TVM,
but neither sqlite-utils nor xgboost, and must be able to import the runner.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "TuningDatabase": "database", "load_space": "spec", "SearchSpace": "spec", "Workload": "spec",
    "tune": "tune", "TuneOptions": "tune", "SpatialtuneError": "errors", "SpecError": "errors",
    "DatabaseError": "errors", "DeviceError": "errors", "ConfigError": "errors",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'spatialtune' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
