"""A partition whose shares are held elsewhere: by measuring servers, or by the GPU host that runs
a bundle later. It grants shares by the device's own rule (same kind, same totals) and holds
nothing here; whoever measures sets up and enforces the share itself."""

from __future__ import annotations

from ..device import DeviceInfo
from ..terms import Share
from . import Partition, create_partition
from .cpu import CpuPartition


class RemotePartition(Partition):
    """``kind``'s shares of ``device``, granted as the measuring host grants them (each measuring
    host checks that its grant matches)."""

    scope = "remote"

    def __init__(self, kind: str, device: DeviceInfo):
        self.kind = kind
        if kind == "cpu":
            self._rule: Partition = CpuPartition(cores=list(range(device.units)))
        else:
            self._rule = create_partition(kind, total_sms=device.units)

    def grant(self, ratio: float) -> Share:
        return self._rule.grant(ratio)

    def neighbour_share(self, share: Share) -> Share | None:
        return self._rule.neighbour_share(share)
