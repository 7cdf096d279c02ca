"""The partition contract: "run this measurement with share r of the device".

A :class:`Partition` maps a requested ratio (percent of the device) to a
:class:`~spatialtune.terms.Share` that says what was actually granted (whole cores, whole SMs),
and it applies that share to a measuring worker in one of two ways:

- **process-level** caps are fixed when the worker starts (``worker_env``): MPS reads
  ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` once per process, so one worker serves one share;
- **in-process** caps are applied inside the worker (``enter``): a CPU core set through
  ``sched_setaffinity``, a CUDA green context with an exact SM count.

Either way the runner keeps one long-lived worker per (share, interference) and records the
granted share with every measurement. Ratio-to-units rounding lives only in each ``grant``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..terms import Share


class Partition(ABC):
    """Contract for a way of capping the resources a measurement may use.

    - ``grant(ratio)`` is pure and deterministic: the same ratio always maps to the same units.
    - ``worker_env(share)`` returns the environment additions a measuring worker needs *at
      start*; ``enter(share)`` runs inside that worker before its first measurement and may
      return the units it actually sees (recorded instead of the planned ones).
    - ``setup()``/``teardown()`` bracket a tuning job (start/stop a daemon); ``teardown`` must be
      safe to call twice and after a failed ``setup``.
    - ``neighbour_share(share)`` is the rest of the device, where an interference co-runner goes.
    """

    kind: str = ""
    scope: str = "in-process"  # or "process"

    @abstractmethod
    def grant(self, ratio: float) -> Share: ...

    def worker_env(self, share: Share) -> dict[str, str]:
        return {}

    def enter(self, share: Share) -> int | None:
        return None

    def neighbour_share(self, share: Share) -> Share | None:
        return None

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    def __enter__(self) -> "Partition":
        self.setup()
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()
