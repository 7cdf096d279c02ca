"""Exceptions the library raises. The CLI turns each into one line and exit code 2."""


class SpatialtuneError(Exception):
    """Base class: a problem the user can fix, reported as one line."""


class SpecError(SpatialtuneError):
    """A search-space file or workload spec is malformed."""


class DatabaseError(SpatialtuneError):
    """The tuning database cannot be opened, is of another schema, or would mix devices."""


class DeviceError(SpatialtuneError):
    """The requested device, partition or interference is not available on this machine."""


class ConfigError(SpatialtuneError):
    """Bad options (ratios, budgets, names)."""
