"""spatialtune: tune TVM kernels for a share of the device and a noisy neighbour.

The library API (the CLI is a thin layer over it)::

    from spatialtune import load_space, TuningDatabase, tune, TuneOptions
    space = load_space("search_spaces/demo.toml")
    with TuningDatabase("tuning_db/spatialtune.sqlite") as db:
        summary = tune(space.select(["dense_small"]), [50, 100], db, TuneOptions(trials=32))
"""

__version__ = "0.1.0"

from .database import TuningDatabase  # noqa: E402
from .errors import ConfigError, DatabaseError, DeviceError, SpatialtuneError, SpecError  # noqa: E402
from .spec import SearchSpace, Workload, load_space  # noqa: E402


def tune(*args, **kwargs):
    """See :func:`spatialtune.tune.tune` (imported lazily: it pulls in TVM)."""
    from .tune import tune as _tune

    return _tune(*args, **kwargs)


def __getattr__(name):
    if name == "TuneOptions":
        from .tune import TuneOptions

        return TuneOptions
    raise AttributeError(name)


__all__ = ["TuningDatabase", "load_space", "SearchSpace", "Workload", "tune", "TuneOptions", "SpatialtuneError",
           "SpecError", "DatabaseError", "DeviceError", "ConfigError"]
