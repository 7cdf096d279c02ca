"""The measuring side of ``spatialtune serve``: one long-lived measuring service per server, and
the two functions its RPC sessions call.

TVM's RPC server forks a fresh process for every session (so the server can kill one that
outlives its session timeout). A measuring worker must outlive sessions, though: it holds the
share (a core set, an MPS client, a green context) and has paid TVM's import, so starting one per
session would cost seconds per candidate. So the serve process keeps a :class:`MeasureService`
(a :class:`~spatialtune.measure.runner.LocalRunner`, the same runner, checks and failure
handling as a local run) and each session process hands it requests over a private Unix socket
(mode 0700 directory, random auth key), one measurement at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from multiprocessing.connection import Client, Listener
from typing import Any

from ..device import DeviceInfo
from ..measure.runner import LocalRunner, RunInput, RunSettings
from ..measure.worker import WorkerError
from ..partitions import Partition
from .protocol import INFO_FN, MEASURE_FN, PROTOCOL, dumps, loads

log = logging.getLogger(__name__)

IDLE_RELEASE_S = 2.0  # a neighbour kept running between requests of one condition stops after this


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1][:300]}" if text else type(e).__name__


class MeasureService:
    """Measures the requests of this server's sessions, one at a time, with one LocalRunner whose
    workers (one per share) live as long as the server. Between requests of the same share and
    neighbour the neighbour keeps running, as it does through a local batch."""

    def __init__(self, partition: Partition, device: DeviceInfo, info: dict[str, Any]):
        self.partition, self.device = partition, device
        self.info = dict(info) | {"protocol": PROTOCOL, "device": device.to_dict(), "partition": partition.kind}
        self.runner = LocalRunner(partition, device_kind=device.kind)
        self._lock = threading.Lock()
        self._held: tuple[tuple, contextlib.ExitStack, Any] | None = None
        self._last = time.monotonic()
        self._closed = threading.Event()
        self.dir = tempfile.mkdtemp(prefix="spatialtune-serve-")  # 0700: only this user reaches the socket
        self.address = os.path.join(self.dir, "measure.sock")
        self.authkey = os.urandom(32)
        self._listener = Listener(self.address, family="AF_UNIX", authkey=self.authkey)
        for target in (self._accept_loop, self._idle_loop):
            threading.Thread(target=target, daemon=True, name=f"service-{target.__name__}").start()

    # -- requests ------------------------------------------------------------------------------

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        """One request (see :mod:`spatialtune.distributed.protocol`) -> ``{"result"}`` or ``{"error"}``."""
        try:
            return self._handle(req)
        except Exception as e:  # whatever it is, the driver gets one line and measures elsewhere
            log.warning("request failed: %s", one_line(e))
            return {"error": one_line(e)}

    def _handle(self, req: dict[str, Any]) -> dict[str, Any]:
        if req.get("protocol") != PROTOCOL:
            return {"error": f"the driver speaks protocol {req.get('protocol')}, this server {PROTOCOL}: run the "
                             "same spatialtune version on both"}
        if req.get("device_id") != self.device.id:
            return {"error": f"this server measures on {self.device.name} [{self.device.id}], the request is for "
                             f"[{req.get('device_id')}]"}
        asked = req["share"]
        if asked["partition"] != self.partition.kind:
            return {"error": f"this server holds {self.partition.kind} shares, the request is for {asked['partition']}"}
        share = self.partition.grant(float(asked["ratio"]))
        if (share.units, share.total) != (asked["units"], asked["total"]):
            return {"error": f"{asked['ratio']:g}% is {share.units}/{share.total} {share.unit}s here, the driver "
                             f"expected {asked['units']}/{asked['total']}"}
        with self._lock:
            self.runner.settings = RunSettings(**req["settings"])
            held = self._hold(share, req["interference"])
            try:
                # Started here rather than inside the measurement: a worker that cannot start (a
                # lost device, a broken environment) makes this server fail the request, so the
                # candidate is measured elsewhere instead of being recorded as a failed kernel.
                self.runner.worker_for(share)
            except WorkerError as e:
                return {"error": f"the measuring worker did not start: {e}"}
            if req["kind"] == "numpy":
                res = held.numpy(req["workload"])
            else:
                res = held.measure(RunInput(req["workload"], req["artifact"], req.get("cubin")))
            self._last = time.monotonic()
        return {"result": res.to_dict()}

    def _hold(self, share, interference: str):
        key = (share.partition_kind, share.units, share.cores, interference)
        if self._held is not None and self._held[0] == key:
            return self._held[2]
        self._release()
        stack = contextlib.ExitStack()
        held = stack.enter_context(self.runner.hold(share, interference))
        self._held = (key, stack, held)
        return held

    def _release(self) -> None:
        if self._held is not None:
            _, stack, _ = self._held
            self._held = None
            stack.close()

    # -- plumbing --------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn = self._listener.accept()
            except Exception:  # closed, or a peer without the key
                if self._closed.is_set():
                    return
                continue
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True, name="service-conn").start()

    def _serve_conn(self, conn) -> None:
        with conn:
            try:
                req = conn.recv()
                conn.send(self.handle(req))
            except (EOFError, OSError):
                pass  # the session went away (killed after its timeout): nobody to answer

    def _idle_loop(self) -> None:
        while not self._closed.wait(0.5):
            with self._lock:
                if self._held is not None and time.monotonic() - self._last > IDLE_RELEASE_S:
                    self._release()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(Exception):
            self._listener.close()
        with self._lock:
            self._release()
            self.runner.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- in a session process

_service: dict[str, Any] = {}


def register_functions(service: MeasureService) -> None:
    """Register the functions sessions call. Done in the serve process before TVM's server starts,
    so every forked session process has them (and the service's address and key)."""
    import tvm_ffi

    _service.update(address=service.address, authkey=service.authkey, info=dumps(service.info))
    tvm_ffi.register_global_func(INFO_FN, session_info, override=True)
    tvm_ffi.register_global_func(MEASURE_FN, session_measure, override=True)


def session_info() -> str:
    return _service["info"]


def session_measure(request: str) -> str:
    """Runs in a session process: resolve the uploaded files, ask the service, answer in JSON."""
    try:
        import tvm

        req = loads(request)
        workpath = tvm.get_global_func("tvm.rpc.server.workpath")
        for k in ("artifact", "cubin"):
            if req.get(k):
                req[k] = str(workpath(req[k]))
        with Client(_service["address"], family="AF_UNIX", authkey=_service["authkey"]) as conn:
            conn.send(req)
            reply = conn.recv()
    except (EOFError, OSError) as e:
        reply = {"error": f"this server's measuring service is gone ({one_line(e)})"}
    except Exception as e:
        reply = {"error": one_line(e)}
    return dumps(reply)
