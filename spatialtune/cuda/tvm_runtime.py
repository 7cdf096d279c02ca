"""TVM's CUDA runtime in a measuring process: runtime-only TVM, precompiled cubins, poisoned contexts.

- **Runtime-only TVM.** On a GPU host that only has ``libtvm_runtime`` (``TVM_USE_RUNTIME_LIB=1``)
  the CUDA backend is not auto-loaded: :func:`import_tvm` loads ``libtvm_runtime_cuda.so`` with
  ctypes before any CUDA module is touched.
- **No compile at load.** TVM 0.27 keeps CUDA source in an exported module and calls
  ``tvm_callback_cuda_compile`` when it is loaded. We override that callback with one that returns
  the cubin the builder made for the same source (keyed by sha256 of the source; see cubin.py) and
  refuses to compile anything else, so a missing cubin is a failed candidate, never a 3 s NVRTC run.
- **Poisoned contexts.** After an illegal address or a launch failure every later CUDA call in the
  process fails. The guarded module returned by :func:`load_module` synchronises after each call
  and, when the context is poisoned, logs the error and leaves with ``os._exit``: the parent sees a
  crashed worker, records the candidate as ``runtime_error`` and starts a fresh worker.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import sys
from typing import Any

from ..errors import DeviceError
from .driver import driver
from .green import check_green_current

log = logging.getLogger(__name__)

POISONED_EXIT = 75  # exit code of a worker whose CUDA context was poisoned by a candidate

_state: dict[str, Any] = {"cubins": {}, "pending": None, "tvm": None}


def import_tvm():
    """TVM with its CUDA backend loaded, and our compile callback installed."""
    if _state["tvm"] is not None:
        return _state["tvm"]
    import tvm

    lib_dir = os.path.join(os.path.dirname(tvm.__file__), "lib")
    if tvm.get_global_func("device_api.cuda", allow_missing=True) is None:
        path = os.path.join(lib_dir, "libtvm_runtime_cuda.so")
        if not os.path.exists(path):
            raise DeviceError(f"this TVM has no CUDA runtime ({path} is missing)")
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    try:  # runtime-only TVM has no Target.current, which TVM's own nvcc helper calls
        import tvm.target

        if not hasattr(tvm.target.Target, "current"):
            tvm.target.Target.current = staticmethod(lambda allow_none=True: None)
    except Exception:
        pass
    import tvm_ffi

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", _precompiled, override=True)
    _state["tvm"] = tvm
    return tvm


def _precompiled(code, *args):
    key = hashlib.sha256(code.encode() if isinstance(code, str) else bytes(code)).hexdigest()
    blob = _state["cubins"].get(key)
    if blob is None:
        pending = _state["pending"]
        if pending is None:
            raise DeviceError("no precompiled cubin for this CUDA source (refusing to JIT-compile at load)")
        # The source TVM hands us differs from the one the builder hashed (e.g. a TVM that
        # rewrites the prelude); the module being loaded has exactly one CUDA source, so its own
        # cubin is the right one.
        log.warning("cubin key mismatch for %s; using the cubin shipped with it", pending[0])
        blob = pending[1]
    return bytearray(blob)


def register_cubin(cubin_path: str) -> bytes:
    blob = open(cubin_path, "rb").read()
    meta_path = cubin_path + ".json"
    key = None
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            key = json.load(f).get("source_sha256")
    if key:
        _state["cubins"][key] = blob
    _state["pending"] = (os.path.basename(cubin_path), blob)
    return blob


def load_module(artifact: str, cubin: str | None):
    """Load an exported candidate with its precompiled cubin; returns a guarded module."""
    tvm = import_tvm()
    if cubin:
        register_cubin(cubin)
    else:
        _state["pending"] = None
    mod = tvm.runtime.load_module(artifact)
    return GuardedModule(mod)


def context_poisoned() -> str | None:
    """The sticky error of the current context, or None when it still works."""
    cu = driver()
    r = cu.cuCtxSynchronize()
    err = r[0] if isinstance(r, tuple) else r
    if err == cu.CUresult.CUDA_SUCCESS:
        return None
    return getattr(err, "name", str(err))


def die_if_poisoned(exc: BaseException) -> None:
    """After a failed CUDA call: leave the process if the context cannot be used any more."""
    try:
        sticky = context_poisoned()
    except Exception as e:  # the driver itself is unusable: also a reason to start afresh
        sticky = f"driver unusable ({e})"
    if sticky is None:
        return
    msg = f"CUDA context poisoned by this candidate ({sticky}): {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    log.error(msg)
    print(msg, file=sys.stderr, flush=True)
    os._exit(POISONED_EXIT)


class GuardedModule:
    """A loaded module whose calls synchronise and check the context (see the module doc)."""

    def __init__(self, mod):
        self._mod = mod

    def __getitem__(self, name: str):
        f = self._mod[name]

        def call(*args):
            try:
                r = f(*args)
                ctx_sync()
            except Exception as e:
                die_if_poisoned(e)
                raise
            check_green_current()
            return r

        return call

    def time_evaluator(self, name: str, dev, **kw):
        ev = self._mod.time_evaluator(name, dev, **kw)

        def run(*args):
            try:
                return ev(*args)
            except Exception as e:
                die_if_poisoned(e)
                raise

        return run

    def __getattr__(self, name: str):
        return getattr(self._mod, name)


def ctx_sync() -> None:
    """Synchronise the current context and raise on an error (sticky or not)."""
    cu = driver()
    r = cu.cuCtxSynchronize()
    err = r[0] if isinstance(r, tuple) else r
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA error after the kernel: {getattr(err, 'name', err)}")
