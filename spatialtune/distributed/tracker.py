"""Talking to TVM's RPC tracker (``python -m tvm.exec.rpc_tracker``) with time limits.

TVM's own ``TrackerSession`` blocks without a limit (and retries a refused connection for a
minute); a job must instead say at once that a tracker is unreachable, notice when it goes away
while waiting for a server, and give up waiting when no server is left. The messages are TVM's
(``tvm.rpc.base``): a magic number, then length-prefixed JSON.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from typing import Any

from ..errors import DeviceError

ANSWER_S = 10.0  # a tracker that takes longer to answer a summary is not working
# How long a server or a driver waits for a tracker that is still starting (and a driver for its
# first server): started together on one host, the tracker is a process importing TVM.
START_WAIT_S = 30.0


class TrackerError(DeviceError):
    """The tracker cannot be reached, went away or does not answer."""


class TrackerRefused(TrackerError):
    """Nothing listens at the tracker's address (yet)."""


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    from tvm.rpc import base

    where = f"tracker {host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        raise TrackerRefused(f"{where} refused the connection (is `python -m tvm.exec.rpc_tracker` running "
                          "there?)") from None
    except socket.gaierror as e:
        raise TrackerError(f"{where}: unknown host ({e.strerror})") from None
    except TimeoutError:
        raise TrackerError(f"{where} did not answer within {timeout:g} s") from None
    except OSError as e:
        raise TrackerError(f"{where} is not reachable: {e.strerror or e}") from None
    try:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
    except TimeoutError:
        sock.close()
        raise TrackerError(f"{where} did not answer within {timeout:g} s") from None
    except OSError as e:
        sock.close()
        raise TrackerError(f"{where} closed the connection ({e.strerror or e})") from None
    if magic != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise TrackerError(f"{host}:{port} is not a TVM RPC tracker")
    return sock


def tracker_summary(host: str, port: int, timeout: float = ANSWER_S) -> dict[str, Any]:
    """The tracker's summary (``queue_info`` per key, ``server_info`` per registered server)."""
    from tvm.rpc import base

    sock = _connect(host, port, timeout)
    try:
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        value = base.recvjson(sock)
    except TimeoutError:
        raise TrackerError(f"tracker {host}:{port} did not answer within {timeout:g} s") from None
    except (OSError, ValueError) as e:
        raise TrackerError(f"tracker {host}:{port} went away ({e})") from None
    finally:
        sock.close()
    if not (isinstance(value, list) and value and value[0] == base.TrackerCode.SUCCESS):
        raise TrackerError(f"tracker {host}:{port} gave an unexpected answer: {str(value)[:100]}")
    return value[1]


def wait_for_tracker(host: str, port: int, seconds: float) -> dict[str, Any]:
    """The tracker's summary, waiting up to ``seconds`` for a tracker that refuses connections:
    a tracker, its servers and a job are often started together, and the tracker (a child process
    importing TVM) listens a few seconds after its command returns. Any other failure is
    reported at once."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return tracker_summary(host, port)
        except TrackerRefused:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def servers_under(summary: dict[str, Any], key: str) -> list[str]:
    """``host:port`` of every server registered under ``key`` (free or busy)."""
    return sorted(f"{s['addr'][0]}:{s['addr'][1]}" for s in summary.get("server_info", [])
                  if s.get("key") == f"server:{key}")


class ServerRequest:
    """A place in the tracker's queue for a server of ``key``: the tracker answers when one is free
    (first come, first served). Closing it gives the place up."""

    def __init__(self, host: str, port: int, key: str, priority: int = 1, timeout: float = ANSWER_S):
        from tvm.rpc import base

        self.where = f"tracker {host}:{port}"
        self._sock = _connect(host, port, timeout)
        try:
            base.sendjson(self._sock, [base.TrackerCode.REQUEST, key, "", priority])
        except OSError as e:
            self.close()
            raise TrackerError(f"{self.where} went away ({e.strerror or e})") from None

    def wait(self, seconds: float) -> tuple[str, int, str] | None:
        """(host, port, match key) of the server handed to us, or None if none within ``seconds``."""
        from tvm.rpc import base

        if not select.select([self._sock], [], [], seconds)[0]:
            return None
        try:
            self._sock.settimeout(ANSWER_S)
            value = base.recvjson(self._sock)
        except (OSError, ValueError, struct.error) as e:
            raise TrackerError(f"{self.where} went away (connection closed: {e})") from None
        finally:
            self._sock.settimeout(None)
        if not (isinstance(value, list) and value and value[0] == base.TrackerCode.SUCCESS):
            raise TrackerError(f"{self.where} gave an unexpected answer: {str(value)[:100]}")
        url, port, matchkey = value[1]
        return str(url), int(port), str(matchkey)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
