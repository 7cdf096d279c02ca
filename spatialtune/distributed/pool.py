"""The driver's pool of measuring servers behind one tracker key.

``lanes`` threads (one per server registered when the job started) each take a place in the
tracker's queue when there is work, open a session with the server the tracker hands them, and
measure pending jobs one at a time until none is left for a moment; then the session is closed
and the server goes back to the tracker for whoever needs it next. Jobs come from every
``RpcRunner.run`` in flight, so a batch is spread over all free servers, and the batches of
several tuning keys (tuned in threads) share them.

Faults. Every RPC call has a time limit that starts when the call starts, never while waiting for
a server. A call that fails or outlives its limit (the client process making it is then killed)
costs that attempt: the session is closed, the server is charged a failure, and the job goes back
to the front of the queue for a server it has not failed on (the same one only when no other is
left); after ``retries`` attempts it is recorded as ``runtime_error`` with every server's reason. A
server that fails ``set_aside_after`` times in a row is set aside for the rest of the job (a
warning names it), and a server of another device model or partition is set aside at once. When
the tracker goes away, or no usable server is left, the pool stops: jobs already being measured
finish, the others are handed back unmeasured, and the runner raises one line.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import DeviceError
from ..measure.runner import MeasureResult
from ..measure.worker import Worker, WorkerError
from .protocol import PROTOCOL
from .tracker import START_WAIT_S, ServerRequest, TrackerError, servers_under, tracker_summary, wait_for_tracker

log = logging.getLogger(__name__)

IDLE_S = 1.0  # a session with nothing to measure for this long is given back to the tracker
CHECK_S = 5.0  # how often a waiting lane asks the tracker which servers are registered
GONE_S = 20.0  # no server registered under the key for this long: the job cannot go on
CONNECT_S = 30.0  # limit for connecting to a server and asking who it is


@dataclass(eq=False)
class Job:
    """One measurement to make; ``deliver`` gets its result, or None if the pool stopped first."""

    request: dict[str, Any]
    artifact: str | None
    cubin: str | None
    timeout: float
    deliver: Callable[[MeasureResult | None], None]
    avoid: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


@dataclass
class ServerStats:
    measured: int = 0
    failures: int = 0
    in_a_row: int = 0
    busy_s: float = 0.0  # the server's own time for the measurements it returned
    aside: str | None = None  # why it was set aside


class ServerPool:
    def __init__(self, tracker: tuple[str, int], key: str, *, lanes: int | None = None, retries: int = 3,
                 set_aside_after: int = 3, session_s: float = 600.0, first_wait_s: float = START_WAIT_S):
        self.tracker, self.key = tracker, key
        self.where = f"key {key!r} at tracker {tracker[0]}:{tracker[1]}"
        self.retries, self.set_aside_after, self.session_s = retries, set_aside_after, session_s
        self.servers: dict[str, ServerStats] = {}
        self.expect: dict[str, Any] | None = None  # what every server must be: set by probe()
        self.fatal: str | None = None
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._closed = False
        self._registered = self._wait_for_servers(first_wait_s)
        self._seen_at = self._checked_at = time.monotonic()
        self._max_lanes = lanes
        self.lanes = max(1, min(lanes or len(self._registered), len(self._registered)))
        self._workers: list[Worker] = []
        self._threads: list[threading.Thread] = []

    # -- the caller's side -----------------------------------------------------------------------

    def probe(self) -> dict[str, Any]:
        """Info of one server (the device and partition the job measures on; servers of another
        model are then set aside)."""
        worker = self._worker(0)
        last = "no server was handed out"
        for _ in range(3):
            got = self._acquire(wanted=lambda: True)
            if got is None:
                break
            addr, info = self._open(worker, got)
            if info is not None:
                self._close_session(worker)
                self.expect = {"device_id": info["device"]["id"], "partition": info["partition"]}
                return info
            last = f"server {addr} {self.servers[addr].aside or 'failed'}"
        raise DeviceError(f"no usable server under {self.where}: {last}")

    def submit(self, jobs: list[Job]) -> None:
        with self._cond:
            if self.fatal or self._closed:
                for j in jobs:
                    j.deliver(None)
                return
            self._pending.extend(jobs)
        try:
            self._check_registered()  # servers that joined since the last look get lanes too
        except DeviceError:
            pass  # a lane waiting for a server finds out and stops the pool
        with self._cond:
            while len(self._threads) < self.lanes:
                t = threading.Thread(target=self._lane, args=(len(self._threads),), daemon=True,
                                     name=f"rpc-lane{len(self._threads)}")
                self._threads.append(t)
                t.start()
            self._cond.notify_all()

    def cancel(self, jobs: list[Job]) -> None:
        """Drop those of ``jobs`` not yet being measured (their caller stopped waiting)."""
        with self._cond:
            drop = set(map(id, jobs))
            self._pending = deque(j for j in self._pending if id(j) not in drop)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            left, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        for j in left:
            j.deliver(None)
        for t in self._threads:
            t.join(IDLE_S + 2)
        for w in self._workers:  # a lane still in a call: its client dies, the call returns
            if w.alive and w.pid:
                try:
                    os.killpg(w.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for t in self._threads:
            t.join(5)
        for w in self._workers:
            w.close()

    # -- a lane ----------------------------------------------------------------------------------

    def _lane(self, i: int) -> None:
        try:
            self._lane_loop(i)
        except Exception as e:  # a lane that died silently would leave its caller waiting forever
            log.exception("measuring lane %d failed", i)
            self._stop(f"a measuring lane failed ({type(e).__name__}: {e})")

    def _lane_loop(self, i: int) -> None:
        worker = self._worker(i)
        while True:
            with self._cond:
                while not (self._closed or self.fatal or self._pending):
                    self._cond.wait(1.0)
                if self._closed or self.fatal:
                    return
            try:
                got = self._acquire(wanted=lambda: bool(self._pending))
            except TrackerError as e:
                self._stop(f"lost the tracker: {e}")
                return
            except DeviceError as e:
                self._stop(str(e))
                return
            if got is None:
                continue
            addr, info = self._open(worker, got)
            if info is not None:
                self._measure_on(worker, addr)

    def _worker(self, i: int) -> Worker:
        with self._cond:
            while len(self._workers) <= i:
                self._workers.append(Worker(init="spatialtune.distributed.client:init_client",
                                            name=f"rpc-client{len(self._workers)}"))
            return self._workers[i]

    def _acquire(self, wanted: Callable[[], bool]) -> tuple[str, str, int, str] | None:
        """Wait in the tracker's queue for a server: (addr, host, port, match key), or None when
        no longer wanted (or the server handed out is set aside). Raises DeviceError when the
        tracker goes away or no server is left."""
        req = ServerRequest(*self.tracker, self.key)
        try:
            while True:
                got = req.wait(1.0)
                if got is not None:
                    break
                with self._cond:
                    if self._closed or self.fatal or not wanted():
                        return None
                self._check_registered()
        finally:
            req.close()
        host, port, matchkey = got
        addr = f"{host}:{port}"
        with self._cond:
            stats = self.servers.setdefault(addr, ServerStats())
            # Not connecting keeps a set-aside server from being handed to us again at once: the
            # server offers itself anew only after some seconds without the connection.
            return None if stats.aside else (addr, host, port, matchkey)

    def _check_registered(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < CHECK_S:
            return
        self._checked_at = now
        registered = set(servers_under(tracker_summary(*self.tracker), self.key))
        with self._cond:
            self._registered = registered
            usable = registered - {a for a, s in self.servers.items() if s.aside}
            if registered:
                self._seen_at = now
            if len(usable) > self.lanes and self._max_lanes is None:  # servers that joined since
                self.lanes = len(usable)
        if not registered and now - self._seen_at > GONE_S:
            raise DeviceError(f"no server is registered under {self.where} any more")
        if registered and not usable:
            raise DeviceError(f"every server under {self.where} has been set aside ({self._asides()})")

    def _open(self, worker: Worker, got) -> tuple[str, dict[str, Any] | None]:
        addr, host, port, matchkey = got
        reply = self._call(worker, CONNECT_S, "connecting", "open_session", host, port, matchkey,
                           self.session_s + 4 * CONNECT_S)
        if "rpc_error" in reply:
            self._failed(addr, reply["rpc_error"])
            return addr, None
        why = None
        if reply.get("protocol") != PROTOCOL:
            why = f"speaks protocol {reply.get('protocol')}, this driver {PROTOCOL} (run one spatialtune version)"
        elif self.expect and reply["device"]["id"] != self.expect["device_id"]:
            why = (f"is a {reply['device']['name']} [{reply['device']['id']}], not the job's device "
                   f"[{self.expect['device_id']}] (give each device model its own --key)")
        elif self.expect and reply["partition"] != self.expect["partition"]:
            why = f"holds {reply['partition']} shares, the job measures {self.expect['partition']} shares"
        if why:
            self._close_session(worker)
            self._set_aside(addr, why)
            return addr, None
        return addr, reply

    def _measure_on(self, worker: Worker, addr: str) -> None:
        opened = time.monotonic()
        while time.monotonic() - opened < self.session_s:
            job = self._take(addr)
            if job is None:
                break
            try:
                reply = self._call(worker, job.timeout, "measuring", "measure", job.request, job.artifact, job.cubin)
            except Exception:
                with self._cond:  # back in the queue: the lane's _stop answers it with the rest
                    self._pending.appendleft(job)
                raise
            if "result" in reply:
                res = MeasureResult(**reply["result"])
                with self._cond:
                    s = self.servers[addr]
                    s.measured, s.in_a_row, s.busy_s = s.measured + 1, 0, s.busy_s + (res.run_s or 0.0)
                job.deliver(res)
                continue
            what = reply.get("rpc_error") or f"could not measure: {reply.get('error')}"
            self._failed(addr, what, "; the candidate is measured again" if len(job.errors) + 1 < self.retries else "")
            self._retry(job, addr, what)
            if "rpc_error" in reply:
                break  # the session is gone or in an unknown state
        self._close_session(worker)

    def _take(self, addr: str) -> Job | None:
        deadline = time.monotonic() + IDLE_S
        with self._cond:
            while not (self._closed or self.fatal or self.servers[addr].aside):
                usable = self._registered - {a for a, s in self.servers.items() if s.aside}
                for job in self._pending:
                    if addr not in job.avoid or usable <= job.avoid:
                        self._pending.remove(job)
                        return job
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        return None

    def _call(self, worker: Worker, timeout: float, doing: str, fn: str, *args) -> dict[str, Any]:
        try:
            return worker.call(f"spatialtune.distributed.client:{fn}", *args, timeout=timeout)
        except WorkerError as e:
            if e.kind == "timeout":  # the client was killed, and its session with it
                return {"rpc_error": f"did not answer within {timeout:g} s while {doing}"}
            return {"rpc_error": f"failed while {doing}: the client process: {e}"}

    def _close_session(self, worker: Worker) -> None:
        if worker.alive:
            self._call(worker, CONNECT_S, "closing the session", "close_session")

    # -- accounting ------------------------------------------------------------------------------

    def _failed(self, addr: str, what: str, then: str = "") -> None:
        with self._cond:
            s = self.servers.setdefault(addr, ServerStats())
            s.failures += 1
            s.in_a_row += 1
            log.warning("server %s %s%s", addr, what, then)
            if s.in_a_row >= self.set_aside_after and not s.aside:
                self._set_aside(addr, f"failed {s.in_a_row} times in a row (last: {what})")

    def _set_aside(self, addr: str, why: str) -> None:
        with self._cond:
            s = self.servers.setdefault(addr, ServerStats())
            if s.aside:
                return
            s.aside = why
            log.warning("setting server %s aside for the rest of this job: it %s", addr, why)
            self._cond.notify_all()

    def _asides(self) -> str:
        return "; ".join(f"{a} {s.aside}" for a, s in sorted(self.servers.items()) if s.aside)

    def _retry(self, job: Job, addr: str, what: str) -> None:
        job.avoid.add(addr)
        job.errors.append(f"{addr} {what}")
        with self._cond:
            if not (self._closed or self.fatal) and len(job.errors) < self.retries:
                self._pending.appendleft(job)
                self._cond.notify_all()
                return
        if self._closed or self.fatal:
            job.deliver(None)
        else:
            job.deliver(MeasureResult(status="runtime_error", error=f"no server could measure it: "
                                                                    f"{'; '.join(job.errors)}"[:2000]))

    def _stop(self, why: str) -> None:
        with self._cond:
            if self.fatal is None:
                self.fatal = why  # the runner raises it, as the job's one line
                log.info("stopping: %s", why)
            left, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        for j in left:
            j.deliver(None)

    def _wait_for_servers(self, seconds: float) -> set[str]:
        deadline = time.monotonic() + seconds
        while True:
            found = set(servers_under(wait_for_tracker(*self.tracker, max(0.0, deadline - time.monotonic())),
                                      self.key))
            if found:
                return found
            if time.monotonic() >= deadline:
                raise DeviceError(f"no server is registered under {self.where} (start one there with "
                                  f"`spatialtune serve --tracker {self.tracker[0]}:{self.tracker[1]} --key "
                                  f"{self.key}`)")
            time.sleep(0.5)

    def stats(self) -> dict[str, dict[str, Any]]:
        with self._cond:
            return {a: vars(s).copy() for a, s in sorted(self.servers.items())}
