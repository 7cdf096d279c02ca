"""Long-lived worker processes with per-call time limits.

Builders and runners do their work in workers so that a candidate that segfaults, hangs or
poisons a CUDA context costs only itself: the parent sees a :class:`WorkerCrashed` or
:class:`WorkerTimeout`, records the candidate as failed and restarts the worker.

A worker is a fresh interpreter (``python -m spatialtune.measure.worker``), not a fork: the parent has
TVM's thread pool and maybe a CUDA context, neither of which survives ``fork``. Its environment
is given explicitly, which is how process-level caps such as ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``
reach it. Messages are pickles on a private pipe pair, so whatever the kernel or TVM prints to
stdout cannot corrupt the protocol. Workers stay alive across calls, because importing TVM's
tensor intrinsics once costs tens of seconds.
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

log = logging.getLogger(__name__)


class WorkerError(Exception):
    """A call failed in the worker. ``kind`` is one of: error, timeout, crashed."""

    kind = "error"

    def __init__(self, message: str, remote_traceback: str = ""):
        super().__init__(message)
        self.remote_traceback = remote_traceback


class WorkerTimeout(WorkerError):
    kind = "timeout"


class WorkerCrashed(WorkerError):
    kind = "crashed"


def _send(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    buf = struct.pack("<Q", len(data)) + data
    view = memoryview(buf)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _recv_exact(fd: int, n: int, deadline: float | None) -> bytes:
    out = io.BytesIO()
    while n > 0:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError
        out.write(chunk)
        n -= len(chunk)
    return out.getvalue()


def _recv(fd: int, deadline: float | None = None) -> Any:
    (n,) = struct.unpack("<Q", _recv_exact(fd, 8, deadline))
    return pickle.loads(_recv_exact(fd, n, deadline))


def resolve(path: str):
    mod, _, name = path.partition(":")
    return getattr(importlib.import_module(mod), name)


class Worker:
    """One worker process. ``call`` runs ``module:function`` there and returns its result.

    Not thread-safe: one caller at a time (a pool gives each thread its own worker).
    """

    def __init__(self, *, init: str | None = None, init_args: tuple = (), env: dict[str, str] | None = None,
                 name: str = "worker", start_timeout: float = 300.0):
        self.init, self.init_args, self.name = init, init_args, name
        self.env = dict(os.environ if env is None else env)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.init_result: Any = None
        self._log = tempfile.NamedTemporaryFile(prefix=f"spatialtune-{name}-", suffix=".log", delete=False)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "Worker":
        if self.alive:
            return self
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        self._log.seek(0)
        self._log.truncate()
        self.proc = subprocess.Popen(
            # the name is for `ps` and for whoever reads a process list; the worker ignores it
            [sys.executable, "-m", "spatialtune.measure.worker", str(p2c_r), str(c2p_w), self.name],
            pass_fds=(p2c_r, c2p_w), env=self.env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            start_new_session=True,  # its own process group: a kill takes the kernel's helpers too
        )
        os.close(p2c_r)
        os.close(c2p_w)
        self._w, self._r = p2c_w, c2p_r
        try:
            self.init_result = self._roundtrip(("__init__", self.init, self.init_args), self.start_timeout)
        except WorkerError:
            self.kill()
            raise
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def kill(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for fd in (self._w, self._r):
            try:
                os.close(fd)
            except OSError:
                pass
        self.proc = None

    def close(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit (running its clean-up), kill it if it does not."""
        if self.alive:
            try:
                _send(self._w, ("__exit__", None, ()))
                self.proc.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        self._log.close()  # one descriptor per worker object: a job makes many builders and runners
        try:
            os.unlink(self._log.name)
        except OSError:
            pass

    def restart(self) -> None:
        self.kill()
        self.restarts += 1
        self.start()

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(self._log.name, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                f.seek(max(0, size - n))
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    # -- calls ----------------------------------------------------------------------------------

    def call(self, fn: str, *args: Any, timeout: float | None = None) -> Any:
        """Run ``fn`` (``"module:function"``) with ``args`` in the worker.

        Raises WorkerTimeout (worker killed; restart it before the next call), WorkerCrashed (the
        process died), or WorkerError (the function raised; the worker is still usable).
        """
        if not self.alive:
            self.start()
        return self._roundtrip(("call", fn, args), timeout)

    def _roundtrip(self, msg, timeout: float | None):
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            _send(self._w, msg)
            reply = _recv(self._r, deadline)
        except TimeoutError:
            self.kill()
            raise WorkerTimeout(f"{self.name}: no answer within {timeout:.0f} s") from None
        except (EOFError, BrokenPipeError, OSError):
            code = self.proc.wait() if self.proc else None
            tail = self.log_tail()
            self.kill()
            raise WorkerCrashed(f"{self.name}: worker died ({_describe_exit(code)})" + (f": {_last_line(tail)}"
                                                                                       if tail else ""), tail) from None
        if reply[0] == "ok":
            return reply[1]
        raise WorkerError(reply[1], reply[2])

    def __enter__(self) -> "Worker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


# ---------------------------------------------------------------- the worker side

_cleanups: list = []


def at_exit(fn) -> None:
    """Register clean-up to run when the parent closes this worker (not on kill)."""
    _cleanups.append(fn)


def _serve(rfd: int, wfd: int) -> None:
    while True:
        try:
            kind, fn, args = _recv(rfd)
        except EOFError:
            break
        if kind == "__exit__":
            break
        try:
            if kind == "__init__":
                result = resolve(fn)(*args) if fn else None
            else:
                result = resolve(fn)(*args)
            _send(wfd, ("ok", result))
        except BaseException as e:  # report everything; the parent decides
            _send(wfd, ("err", f"{type(e).__name__}: {e}".splitlines()[0][:500] if str(e) else type(e).__name__,
                        traceback.format_exc()))
    for fn in reversed(_cleanups):
        try:
            fn()
        except Exception:
            pass


if __name__ == "__main__":
    # Serve from the imported module, not __main__, so at_exit() registrations made by the
    # functions we run land in the list _serve drains.
    from spatialtune.measure import worker as _worker

    _worker._serve(int(sys.argv[1]), int(sys.argv[2]))
