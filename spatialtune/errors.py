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


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception from inside TVM as one log line: its first line (TVM's messages run to a C++
    backtrace), else its type's name."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
