"""Partitions: the mechanisms that grant a share of the device and hold a measuring worker to it.

Created by kind from a registry (``create_partition("cpu" | "mps" | "green")``); each kind is its
own module with the :class:`~spatialtune.partitions.base.Partition` contract.
"""

from __future__ import annotations

import importlib

from ..errors import ConfigError
from .base import Partition

# kind -> (module, class); modules are imported on first use (MPS and green contexts need no GPU
# to import, but nothing should pay for what it does not use)
REGISTRY = {"cpu": ("cpu", "CpuPartition"), "mps": ("mps", "MpsPartition"), "green": ("green", "GreenPartition")}
PARTITIONS = tuple(REGISTRY)


def create_partition(kind: str | Partition, **kwargs) -> Partition:
    """A partition by name (``cpu``, ``mps``, ``green``) or the instance given."""
    if isinstance(kind, Partition):
        return kind
    try:
        mod, cls = REGISTRY[kind]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown partition {kind!r} (known: {', '.join(PARTITIONS)})") from None
    return getattr(importlib.import_module(f".{mod}", __name__), cls)(**kwargs)


__all__ = ["Partition", "PARTITIONS", "create_partition"]
