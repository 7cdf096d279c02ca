"""spatialtune: tune TVM kernels for a share of the device and a noisy neighbour.

The library API (the CLI is a thin layer over it)::

    from spatialtune import load_space, TuningDatabase, tune, TuneOptions
    space = load_space("search_spaces/demo.toml")
    with TuningDatabase("tuning_db/spatialtune.sqlite") as db:
        summary = tune(space.select(["dense_small"]), [50, 100], db, TuneOptions(trials=32))

The pipeline, one subpackage per stage (see docs/architecture.md): ``workloads`` -> ``search``
-> ``measure`` (under ``partitions``, next to ``neighbours``) -> ``store`` -> ``lookup`` and
``report``; ``tuning`` and ``bundle`` drive it, ``cli`` is the command line.

Names are imported lazily: a GPU host that measures bundles has numpy and a runtime-only TVM,
but neither sqlite-utils nor xgboost, and must be able to import the runner. No submodule is
named like an exported function, so ``spatialtune.tune`` is always the function.
"""

__version__ = "0.2.0"

_EXPORTS = {
    "TuningDatabase": "store.database", "load_space": "workloads.spec", "SearchSpace": "workloads.spec",
    "Workload": "workloads.spec", "tune": "tuning.job", "TuneOptions": "tuning.options",
    "Lookup": "lookup.service", "get_lookup": "lookup.service", "key_for": "lookup.service",
    "SpatialtuneError": "errors", "SpecError": "errors", "DatabaseError": "errors", "DeviceError": "errors",
    "ConfigError": "errors",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'spatialtune' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
