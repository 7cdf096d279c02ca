"""``spatialtune serve``: a measuring server that registers with a TVM RPC tracker.

It is TVM's own RPC server (``tvm.rpc.server``, what ``python -m tvm.exec.rpc_server`` runs),
started inside this process with two extra functions registered (see
:mod:`spatialtune.distributed.service`), so the tracker, the matching, the session processes and
the uploads are TVM's. It needs what a bundle host needs: a TVM runtime (runtime-only is enough),
numpy, and on a GPU box the CUDA bindings; no compiler, no database.

A CPU server can be confined to given cores (``--cores 0,1``): the serve process and everything it
starts run there, and its device is that many cores. If the tracker goes away the server keeps
trying to register again, so a restarted tracker finds it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass, replace

from ..errors import ConfigError
from ..partitions import PARTITIONS, Partition, create_partition
from .protocol import PROTOCOL, parse_address
from .service import MeasureService, one_line, register_functions
from .tracker import START_WAIT_S, wait_for_tracker

log = logging.getLogger(__name__)


def parse_cores(text: str | None) -> list[int] | None:
    """``"0,2-3"`` -> [0, 2, 3]; each core must be one this process may run on."""
    if text is None:
        return None
    cores: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            cores.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ConfigError(f"--cores {text!r}: expected core numbers, e.g. 0 or 0,1 or 2-3") from None
    allowed = os.sched_getaffinity(0)
    missing = sorted(cores - allowed)
    if not cores or missing:
        raise ConfigError(f"--cores {text!r}: {'no core given' if not cores else f'cores {missing} are not'} "
                          f"available here (this process may use {_ranges(sorted(allowed))})")
    return sorted(cores)


def _ranges(cores: list[int]) -> str:
    return ",".join(str(c) for c in cores)


@dataclass(frozen=True)
class ListenAt:
    """Where a server listens: the address, the first port tried and the end of the range
    (exclusive; default 9199, or ``port`` + 100 above it), and the address given to the tracker
    when drivers reach the server under another name."""

    host: str = "0.0.0.0"
    port: int = 9091
    port_end: int | None = None
    custom_addr: str | None = None

    def checked(self) -> ListenAt:
        """The same with ``port_end`` filled in; ConfigError when the port range is empty or out of range."""
        port_end = self.port_end or max(9199, self.port + 100)
        if not (0 < self.port < port_end <= 65536):
            raise ConfigError(f"--port {self.port} / --port-end {port_end}: expected 0 < PORT < PORT_END <= 65536")
        return replace(self, port_end=port_end)


def serve(tracker: str, key: str, *, partition: str = "cpu", cores: list[int] | None = None,
          listen: ListenAt = ListenAt(), tracker_wait: float = START_WAIT_S, verbose: bool = False) -> None:
    """Serve measurements under ``key`` until interrupted (SIGINT or SIGTERM). Does not return
    normally: TVM's listening thread cannot be stopped, so the process exits after cleaning up."""
    t_host, t_port = parse_address(tracker)
    if not key or any(c.isspace() for c in key) or ":" in key:
        raise ConfigError(f"--key {key!r}: expected one word without ':' (it names a kind of device)")
    listen = listen.checked()
    if partition not in PARTITIONS:
        raise ConfigError(f"--partition {partition!r}: expected one of {', '.join(PARTITIONS)}")
    if cores is not None:
        os.sched_setaffinity(0, cores)  # this process, its session processes and its workers
    wait_for_tracker(t_host, t_port, tracker_wait)
    part = create_partition(partition)
    with part:
        device = _detect(part)
        service = MeasureService(part, device, {"host": socket.gethostname(), "pid": os.getpid(),
                                                "cores": sorted(os.sched_getaffinity(0))})
        register_functions(service)
        _quiet_tvm(verbose)
        stop = _stop_on_signals()
        code = 0
        try:
            _listen(listen, (t_host, t_port), key, device, part, stop)
        except BaseException as e:  # also KeyboardInterrupt: clean up, then leave
            if not isinstance(e, KeyboardInterrupt):
                print(f"spatialtune: error: {one_line(e)}", file=sys.stderr)
                code = 1
        finally:
            for child in multiprocessing.active_children():  # a session in progress
                child.kill()
            service.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # TVM's listening thread is not a daemon and has no stop


def _detect(part: Partition):
    if part.kind == "cpu":
        from ..device import detect_cpu

        return detect_cpu()
    from ..device import detect_cuda

    return detect_cuda()


def _listen(at: ListenAt, tracker_addr, key, device, part, stop: threading.Event) -> None:
    from tvm.rpc.server import PopenRPCServerState

    first = True
    while not stop.is_set():
        state = PopenRPCServerState(at.host, at.port, at.port_end, tracker_addr=tracker_addr, key=key,
                                    custom_addr=at.custom_addr, silent=True)
        if first:
            print(f"spatialtune serve: {device.name} [{device.id}], {part.kind} partition, "
                  f"{device.units} {device.unit}s; listening on {at.host}:{state.port}, key {key!r} at tracker "
                  f"{tracker_addr[0]}:{tracker_addr[1]} (protocol {PROTOCOL}; no authentication: keep these "
                  f"ports on a private network)", file=sys.stderr, flush=True)
            first = False
        while state.thread.is_alive() and not stop.is_set():
            state.thread.join(0.5)
        if stop.is_set():
            return
        # The listening thread ends when the tracker stayed unreachable for a minute (TVM's
        # connect_with_retry) or a session process failed: keep registering, so a restarted
        # tracker (and the job started again) finds this server.
        log.warning("TVM's RPC server stopped (%s); registering with %s:%d again", _stopped.get("why", "?"),
                    *tracker_addr)
        with contextlib.suppress(OSError):
            state.sock.close()
        stop.wait(2.0)


def _quiet_tvm(verbose: bool) -> None:
    # TVM's server logs every session at INFO on its own handler; and a listening thread that
    # gives up on the tracker prints its traceback through threading's hook: one line instead.
    logging.getLogger("RPCServer").setLevel(logging.INFO if verbose else logging.ERROR)

    def hook(args):
        _stopped["why"] = one_line(args.exc_value) if args.exc_value else "no reason given"
    threading.excepthook = hook


_stopped: dict[str, str] = {}


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum, frame):
        stop.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop

