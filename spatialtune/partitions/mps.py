"""MPS: a measuring worker is an MPS client started with ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``.

A process cannot change its cap, so one ratio is one worker (scope "process"). We use the user's
control daemon when ``CUDA_MPS_PIPE_DIRECTORY`` (or the default ``/tmp/nvidia-mps``) has one;
otherwise we start a private daemon with private pipe and log directories and always quit it in
``teardown`` (also from atexit and on SIGINT/SIGTERM). Every daemon interaction has a timeout: no
GPU or no daemon is a one-line DeviceError, never a hang. We never touch compute mode, clocks,
power limits or MIG.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from ..errors import DeviceError
from ..terms import Share, check_ratio
from .sm import SmPartition, mps_sms_for_ratio

log = logging.getLogger(__name__)

MPS_CONTROL = "nvidia-cuda-mps-control"
MPS_SEARCH_DIRS = ("/usr/local/nvidia/bin", "/usr/bin", "/usr/local/bin", "/usr/local/cuda/bin")
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"
DAEMON_TIMEOUT_S = 10.0


def find_mps_control() -> str | None:
    p = shutil.which(MPS_CONTROL)
    if p:
        return p
    for d in MPS_SEARCH_DIRS:
        cand = os.path.join(d, MPS_CONTROL)
        if os.access(cand, os.X_OK):
            return cand
    return None


class MpsPartition(SmPartition):
    kind = "mps"
    scope = "process"

    def __init__(self, total_sms: int | None = None, control: str | None = None, pipe_dir: str | None = None,
                 timeout: float = DAEMON_TIMEOUT_S):
        self._total = total_sms
        self.control = control
        self.pipe_dir = pipe_dir
        self.log_dir: str | None = None
        self.timeout = timeout
        self.started = False  # True when we started the daemon (and so must quit it)
        self._tmp: str | None = None
        self._old_handlers: dict = {}
        self._lock = threading.Lock()

    def grant(self, ratio: float) -> Share:
        r = check_ratio(ratio)
        return Share("mps", r, mps_sms_for_ratio(r, self.total), self.total, "SM", exact=False)

    def worker_env(self, share: Share) -> dict[str, str]:
        env = {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": _pct(share.ratio)}
        if self.pipe_dir:
            env["CUDA_MPS_PIPE_DIRECTORY"] = self.pipe_dir
        if self.log_dir:
            env["CUDA_MPS_LOG_DIRECTORY"] = self.log_dir
        return env

    def neighbour_share(self, share: Share) -> Share | None:
        rest = 100.0 - share.ratio if share.ratio < 100 else 100.0
        return Share("mps", rest, mps_sms_for_ratio(rest, self.total), self.total, "SM", exact=False)

    # -- daemon ---------------------------------------------------------------------------------

    def _control_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["CUDA_MPS_PIPE_DIRECTORY"] = self.pipe_dir or DEFAULT_PIPE_DIR
        if self.log_dir:
            env["CUDA_MPS_LOG_DIRECTORY"] = self.log_dir
        return env

    def control_cmd(self, text: str) -> str:
        """Send one command to the control daemon (bounded); returns its answer."""
        try:
            r = subprocess.run([self.control], input=text + "\n", capture_output=True, text=True,
                               env=self._control_env(), timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"MPS control daemon did not answer {text!r} within {self.timeout:.0f} s") from None
        if r.returncode != 0:
            raise DeviceError(f"MPS control {text!r} failed: {(r.stderr or r.stdout).strip()[:200] or r.returncode}")
        return r.stdout.strip()

    @staticmethod
    def has_daemon(pipe_dir: str | None) -> bool:
        return bool(pipe_dir) and os.path.exists(os.path.join(pipe_dir, "control"))

    def setup(self) -> None:
        if self.started:
            return
        self.control = self.control or find_mps_control()
        if not self.control:
            raise DeviceError(f"MPS is not available: {MPS_CONTROL} is not on PATH or in {MPS_SEARCH_DIRS[0]}")
        user = self.pipe_dir or os.environ.get("CUDA_MPS_PIPE_DIRECTORY")
        for d in (user, DEFAULT_PIPE_DIR):
            if self.has_daemon(d):
                self.pipe_dir = d
                self.log_dir = os.environ.get("CUDA_MPS_LOG_DIRECTORY")
                self.control_cmd("get_server_list")  # it answers, or DeviceError
                log.info("using the MPS control daemon at %s", d)
                return
        self._tmp = tempfile.mkdtemp(prefix="spatialtune-mps-")
        self.pipe_dir = os.path.join(self._tmp, "pipe")
        self.log_dir = os.path.join(self._tmp, "log")
        os.makedirs(self.pipe_dir)
        os.makedirs(self.log_dir)
        self._arm_cleanup()
        # The daemon forks and may keep inherited pipes open: give it a file, not a pipe, so we
        # never wait on its output.
        out_path = os.path.join(self._tmp, "start.out")
        try:
            with open(out_path, "w") as out:
                r = subprocess.run([self.control, "-d"], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                   env=self._control_env(), timeout=self.timeout)
            r.stdout = r.stderr = open(out_path).read()
        except subprocess.TimeoutExpired:
            self.teardown()
            raise DeviceError(f"MPS control daemon did not start within {self.timeout:.0f} s") from None
        except OSError as e:
            self.teardown()
            raise DeviceError(f"cannot run {self.control}: {e}") from None
        if r.returncode != 0:
            self.teardown()
            raise DeviceError(f"MPS control daemon failed to start: {(r.stderr or r.stdout).strip()[:200]}")
        self.started = True
        deadline = time.monotonic() + self.timeout
        while not self.has_daemon(self.pipe_dir):
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.teardown()
                raise DeviceError(f"MPS control daemon did not open its pipe in {self.timeout:.0f} s"
                                  + (f": {tail}" if tail else ""))
            time.sleep(0.05)
        log.info("started a private MPS control daemon (pipe %s)", self.pipe_dir)

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.log_dir or "", "control.log")) as f:
                lines = [ln.strip() for ln in f if ln.strip()]
            return lines[-1][:200] if lines else ""
        except OSError:
            return ""

    def teardown(self) -> None:
        with self._lock:
            if self.started:
                self.started = False
                try:
                    self.control_cmd("quit")
                except DeviceError as e:
                    log.warning("%s; killing it", e)
                    self._kill_daemon()
                # quit returns at once; wait (bounded) for the daemon to close its pipe
                deadline = time.monotonic() + self.timeout
                while self.has_daemon(self.pipe_dir) and self._daemon_pids() and time.monotonic() < deadline:
                    time.sleep(0.05)
                if self._daemon_pids():
                    self._kill_daemon()
                log.info("stopped the private MPS control daemon")
            self._disarm_cleanup()
            if self._tmp:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None

    def _daemon_pids(self) -> list[int]:
        """Processes whose environment names our private pipe directory (our daemon and server)."""
        if not self._tmp:
            return []
        want = f"CUDA_MPS_PIPE_DIRECTORY={self.pipe_dir}".encode()
        out = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
                if not comm.startswith("nvidia-cuda-mps"):
                    continue
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if want in f.read().split(b"\0"):
                        out.append(int(pid))
            except OSError:
                continue
        return out

    def _kill_daemon(self) -> None:
        for pid in self._daemon_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def _arm_cleanup(self) -> None:
        atexit.register(self.teardown)
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            old = signal.getsignal(sig)
            self._old_handlers[sig] = old

            def handler(signum, frame, old=old):
                self.teardown()
                if callable(old):
                    old(signum, frame)
                elif signum == signal.SIGINT:
                    raise KeyboardInterrupt
                else:
                    raise SystemExit(128 + signum)

            signal.signal(sig, handler)

    def _disarm_cleanup(self) -> None:
        try:
            atexit.unregister(self.teardown)
        except Exception:
            pass
        if threading.current_thread() is threading.main_thread():
            for sig, old in self._old_handlers.items():
                try:
                    signal.signal(sig, old)
                except (TypeError, ValueError):
                    pass
        self._old_handlers.clear()


def _pct(ratio: float) -> str:
    return f"{ratio:g}" if ratio != int(ratio) else str(int(ratio))
