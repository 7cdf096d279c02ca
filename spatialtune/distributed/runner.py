"""The driver's runner: measure built kernels on the servers registered under one tracker key.

:class:`RpcRunner` keeps the :class:`~spatialtune.measure.runner.Runner` contract (one result
per input, each handed to ``on_result`` in the caller's thread as it arrives, so the caller, the
only writer of the database, records it at once) and spreads each batch over the free servers of
the pool (:mod:`spatialtune.distributed.pool`). It is safe to call from several threads: ``tune``
then tunes several workloads at once (``parallel``).

The job's device and partition are the servers' (:meth:`RpcRunner.measures_on`): the first
server the tracker hands out decides them, and servers of another device model are left out, so
one key's measurements never mix models.
"""

from __future__ import annotations

import dataclasses
import queue
from typing import Any, Sequence

from ..device import DeviceInfo, tvm_version
from ..errors import ConfigError, DeviceError
from ..measure.runner import MeasureResult, ResultFn, Runner, RunInput, RunSettings
from ..partitions import Partition
from ..partitions.remote import RemotePartition
from ..terms import Share
from .pool import Job, ServerPool
from .protocol import measure_request, parse_address
from .tracker import START_WAIT_S

GRACE_S = 60.0  # beyond the measurement's own timeout: upload, a measuring worker (re)starting


class RpcRunner(Runner):
    """Measurements on the servers under ``key`` at ``tracker`` (``HOST:PORT``).

    ``rpc_timeout``: the limit of one measurement request, from the moment a server has it
    (default: the measurement's timeout plus a minute). ``first_wait_s``: how long to wait for a
    first server to register. The rest goes to :class:`ServerPool`.
    """

    baselines = True

    def __init__(self, tracker: str, key: str, *, settings: RunSettings | None = None, rpc_timeout: float | None = None,
                 first_wait_s: float = START_WAIT_S, **pool_options: Any):
        if not key or ":" in key or any(c.isspace() for c in key):
            raise ConfigError(f"--key {key!r}: expected one word without ':' (the servers' key)")
        if rpc_timeout is not None and rpc_timeout <= 0:
            raise ConfigError(f"--rpc-timeout must be positive, got {rpc_timeout!r}")
        self.settings = settings or RunSettings()
        self.rpc_timeout = rpc_timeout
        self.pool = ServerPool(parse_address(tracker), key, first_wait_s=first_wait_s, **pool_options)
        self.server_info: dict[str, Any] | None = None

    @property
    def parallel(self) -> int:  # type: ignore[override]
        return self.pool.lanes

    def measures_on(self) -> tuple[DeviceInfo, Partition]:
        if self.server_info is None:
            self.server_info = self.pool.probe()
        served = DeviceInfo.from_dict(self.server_info["device"])
        # The kernels are this TVM's: a server with a runtime-only TVM knows no version of its own.
        device = dataclasses.replace(served, tvm_version=tvm_version() or served.tvm_version)
        return device, RemotePartition(self.server_info["partition"], served)

    def run(self, share: Share, interference: str, inputs: Sequence[RunInput],
            on_result: ResultFn | None = None) -> list[MeasureResult]:
        jobs = [self._job(share, interference, "kernel", item.workload, item.artifact, item.cubin) for item in inputs]
        return self._wait(jobs, on_result)

    def measure_baseline(self, share: Share, interference: str, workload: dict, kind: str,
                         artifact: str | None = None, cubin: str | None = None) -> MeasureResult:
        job = self._job(share, interference, "numpy" if kind == "numpy" else "kernel", workload, artifact, cubin)
        return self._wait([job], None)[0]

    def _job(self, share: Share, interference: str, kind: str, workload: dict, artifact, cubin) -> Job:
        if self.server_info is None:
            self.measures_on()
        timeout = self.rpc_timeout or self.settings.timeout * (4 if kind == "numpy" else 1) + GRACE_S
        req = measure_request(device_id=self.server_info["device"]["id"], kind=kind, workload=workload, share=share,
                              interference=str(interference), settings=self.settings)
        return Job(req, artifact, cubin, timeout, deliver=lambda r: None)

    def _wait(self, jobs: list[Job], on_result: ResultFn | None) -> list[MeasureResult]:
        if not jobs:
            return []
        arrived: queue.Queue = queue.Queue()
        for i, job in enumerate(jobs):
            job.deliver = lambda res, i=i: arrived.put((i, res))
        self.pool.submit(jobs)
        out: list[MeasureResult | None] = [None] * len(jobs)
        lost = 0
        try:
            for _ in jobs:
                i, res = arrived.get()
                if res is None:
                    lost += 1
                    continue
                out[i] = res
                if on_result is not None:
                    on_result(i, res)
        except BaseException:
            self.pool.cancel(jobs)
            raise
        if lost:
            done = len(jobs) - lost
            raise DeviceError(f"{self.pool.fatal or 'the measuring servers were released'}; {done} of {len(jobs)} "
                              f"measurements of this batch were recorded; run the same command again to continue")
        return out  # type: ignore[return-value]

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per server: measured, failures, busy_s (its own time measuring), aside (why, if set aside)."""
        return self.pool.stats()

    def close(self) -> None:
        self.pool.close()
