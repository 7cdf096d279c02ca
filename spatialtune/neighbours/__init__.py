"""Neighbours: a named, reproducible co-runner on the rest of the device while we measure.

Conditions (part of every database key, see :mod:`spatialtune.terms`):

- ``none``: nothing else runs;
- ``cold``: nothing else runs, but each timed run starts with the caches emptied, as a model's
  task runs after the layers before it (CPU);
- ``compute``: an arithmetic-bound loop (a cache-resident GEMM on the CPU, FMA on a GPU);
- ``memory``: a streaming copy far larger than the last-level cache;
- ``tenant:WORKLOAD``: the tuned kernel of another workload, in a loop (GPU).

Each kind is a :class:`~spatialtune.neighbours.base.Neighbour`; ``create_neighbour`` picks
the implementation for the device kind.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..terms import check_interference
from .base import ColdCaches, Neighbour, NoNeighbour


def create_neighbour(spec: str | Neighbour, *, partition=None, device_kind: str = "cpu") -> Neighbour:
    if isinstance(spec, Neighbour):
        return spec
    check_interference(spec)
    if spec == "none":
        return NoNeighbour()
    if spec == "cold":
        if device_kind != "cpu":
            raise ConfigError("interference 'cold' is measured on CPUs only (the GPU runner does not empty L2 yet)")
        return ColdCaches()
    if device_kind == "cuda":
        from .gpu import GpuNeighbour

        return GpuNeighbour(spec, partition)
    if spec.startswith("tenant:"):
        raise ConfigError("interference 'tenant:WORKLOAD' runs on GPUs only (use none, compute or memory on the CPU)")
    from .cpu import CpuNeighbour

    return CpuNeighbour(spec, partition)


__all__ = ["Neighbour", "create_neighbour", "check_interference"]
