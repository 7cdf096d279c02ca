"""Green contexts: an exact SM count through the driver (8-SM steps on Hopper), applied inside the
measuring worker (scope "in-process"); the recorded share is the SM count actually granted."""

from __future__ import annotations

import os

from ..terms import Share, check_ratio
from .sm import GREEN_STEP, SmPartition, ratio_for_sms, sms_for_ratio


class GreenPartition(SmPartition):
    kind = "green"
    scope = "in-process"

    def __init__(self, total_sms: int | None = None, step: int = GREEN_STEP, shim: str | None = None):
        self._total = total_sms
        self.step = step
        self.shim = shim

    def grant(self, ratio: float) -> Share:
        r = check_ratio(ratio)
        return Share("green", r, sms_for_ratio(r, self.total, self.step), self.total, "SM")

    def grant_sms(self, sms: int) -> Share:
        return self.grant(ratio_for_sms(sms, self.total))

    def setup(self) -> None:
        if self.shim is None:
            from ..cuda.green import green_shim_path

            self.shim = green_shim_path()

    def worker_env(self, share: Share) -> dict[str, str]:
        if share.units >= share.total:
            return {}  # the whole device: the primary context, no shim needed
        if self.shim is None:
            self.setup()
        pre = os.environ.get("LD_PRELOAD", "")
        return {"LD_PRELOAD": f"{self.shim} {pre}".strip(), "SPATIALTUNE_GREEN_SHIM": self.shim}

    def neighbour_share(self, share: Share) -> Share | None:
        rest = share.total - share.units
        if rest <= 0:
            return Share("green", 100.0, share.total, share.total, "SM")
        return Share("green", round(100.0 * rest / share.total, 4), rest, share.total, "SM")
