"""The tuning driver: ``tune()`` searches, builds, measures, records and learns for every
(workload, share) of a job; see :mod:`spatialtune.tuning.job`."""

from .job import tune
from .options import ShareResult, TuneOptions, TuneSummary

__all__ = ["ShareResult", "TuneOptions", "TuneSummary", "tune"]
