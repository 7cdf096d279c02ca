"""The tuning driver: ``tune()`` searches, builds, measures, records and learns for every
(workload, share) of a job; see :mod:`spatialtune.tuning.job`, and :mod:`.after_batch` for the
steps after every measured batch. Names load on first use, so the CLI can read the options
without importing the database."""

_EXPORTS = {"tune": "job", "TuneOptions": "options", "ShareResult": "results", "TuneSummary": "results",
            "AfterBatch": "after_batch", "Batch": "after_batch"}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'spatialtune.tuning' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
