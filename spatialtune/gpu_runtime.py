"""The CUDA side of a measuring worker: runtime-only TVM, precompiled cubins, shares, poisoned contexts.

- **Runtime-only TVM.** On a GPU host that only has ``libtvm_runtime`` (``TVM_USE_RUNTIME_LIB=1``)
  the CUDA backend is not auto-loaded: :func:`import_tvm` loads ``libtvm_runtime_cuda.so`` with
  ctypes before any CUDA module is touched.
- **No compile at load.** TVM 0.27 keeps CUDA source in an exported module and calls
  ``tvm_callback_cuda_compile`` when it is loaded. We override that callback with one that returns
  the cubin the builder made for the same source (keyed by sha256 of the source; see cubin.py) and
  refuses to compile anything else, so a missing cubin is a failed candidate, never a 3 s NVRTC run.
- **Green contexts.** TVM's CUDA runtime calls ``cudaSetDevice`` before most operations, and that
  makes the device's primary context current again, which would silently run every kernel on the
  whole GPU. A green worker therefore starts with a tiny ``LD_PRELOAD`` shim whose ``cudaSetDevice``
  makes the green context current instead (:func:`green_shim_path`). The worker checks that the
  green context is still current after the first kernel of every candidate.
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
import subprocess
import sys
import tempfile
from typing import Any

from .errors import DeviceError

log = logging.getLogger(__name__)

POISONED_EXIT = 75  # exit code of a worker whose CUDA context was poisoned by a candidate

_state: dict[str, Any] = {"cubins": {}, "pending": None, "green": None, "tvm": None}


# ---------------------------------------------------------------- driver helpers


def driver():
    try:
        from cuda.bindings import driver as cu
    except ImportError:
        raise DeviceError("cuda-bindings is not installed (needed by CUDA measuring workers)") from None
    return cu


def ck(r, what: str = "CUDA call"):
    """Unpack a cuda-bindings result tuple, raising DeviceError on an error code."""
    cu = driver()
    err = r[0] if isinstance(r, tuple) else r
    if err != cu.CUresult.CUDA_SUCCESS:
        raise DeviceError(f"{what} failed: {getattr(err, 'name', err)}")
    if not isinstance(r, tuple) or len(r) == 1:
        return None
    return r[1] if len(r) == 2 else r[1:]


# ---------------------------------------------------------------- TVM, runtime-only


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


# ---------------------------------------------------------------- worker entry


def enter_cuda_worker(partition_kind: str, share) -> int:
    """Apply ``share`` in this worker and return the SM count its kernels can use."""
    cu = driver()
    ck(cu.cuInit(0), "cuInit")
    dev = ck(cu.cuDeviceGet(0), "cuDeviceGet")
    total = int(ck(cu.cuDeviceGetAttribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev)))
    granted = None
    if partition_kind == "green" and share is not None and share.units < total:
        granted = enter_green(share.units)
    tvm = import_tvm()
    d = tvm.cuda(0)
    if not d.exist:
        raise DeviceError("TVM sees no CUDA device in this worker")
    # Create the runtime context now (and under MPS, the client connection), so the SM count read
    # next is the one this process really gets.
    tvm.runtime.tensor(__import__("numpy").zeros(1, "float32"), d)
    d.sync()
    seen = int(d.multi_processor_count)
    if granted is not None:
        check_green_current()
        seen = granted
    from .worker import at_exit

    at_exit(leave_green)
    log.info("CUDA worker: %s share %s, %d SMs", partition_kind, getattr(share, "units", None), seen)
    return seen


# ---------------------------------------------------------------- green contexts


def split_sms(n: int, *, complement: bool = False):
    """The device's SM resource split into a group of ``n`` SMs (or the rest of the device)."""
    cu = driver()
    ck(cu.cuInit(0), "cuInit")
    dev = ck(cu.cuDeviceGet(0), "cuDeviceGet")
    sm = ck(cu.cuDeviceGetDevResource(dev, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource")
    r = cu.cuDevSmResourceSplitByCount(1, sm, 0, int(n))
    if r[0] != cu.CUresult.CUDA_SUCCESS:
        raise DeviceError(f"cannot split {n} SMs off the device: {r[0].name}")
    groups, _, rest = r[1], r[2], r[3]
    res = rest if complement else groups[0]
    return dev, res


def create_green_ctx(n: int, *, complement: bool = False):
    """(CUcontext, green ctx, SMs granted) for ``n`` SMs or the rest of the device."""
    cu = driver()
    dev, res = split_sms(n, complement=complement)
    got = int(res.sm.smCount)
    if got <= 0:
        raise DeviceError(f"no SMs left for a green context beside {n} SMs")
    desc = ck(cu.cuDevResourceGenerateDesc([res], 1), "cuDevResourceGenerateDesc")
    g = ck(cu.cuGreenCtxCreate(desc, dev, cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM), "cuGreenCtxCreate")
    ctx = ck(cu.cuCtxFromGreenCtx(g), "cuCtxFromGreenCtx")
    return ctx, g, got


def enter_green(n: int, *, complement: bool = False) -> int:
    """Make a green context of ``n`` SMs current for this process's CUDA runtime; returns its SM count."""
    cu = driver()
    ctx, g, got = create_green_ctx(n, complement=complement)
    ck(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    shim = _loaded_shim()
    if shim is None:
        raise DeviceError("green contexts need the cudaSetDevice shim preloaded (GreenPartition.worker_env sets "
                          "LD_PRELOAD); without it TVM runs on the whole GPU")
    shim.spatialtune_green_set(ctypes.c_void_p(int(ctx)))
    _state["green"] = (ctx, g, got, shim)
    return got


def check_green_current() -> None:
    """Raise unless the green context is still the current one (TVM did not switch back)."""
    if _state["green"] is None:
        return
    cu = driver()
    ctx, _, got, shim = _state["green"]
    cur = ck(cu.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if int(cur) != int(ctx):
        raise DeviceError(f"the {got}-SM green context is no longer current (the runtime switched contexts)")


def leave_green() -> None:
    if _state["green"] is None:
        return
    cu = driver()
    ctx, g, _, shim = _state["green"]
    _state["green"] = None
    try:
        shim.spatialtune_green_set(ctypes.c_void_p(0))
        cu.cuCtxSynchronize()
        cu.cuGreenCtxDestroy(g)
    except Exception:
        pass


_SHIM_SRC = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
/* cudaSetDevice makes the primary context current; TVM calls it before most operations. While a
   green context is registered, make that one current instead, so every TVM kernel, allocation and
   timer stays on the green context's SMs. */
typedef int (*set_dev_t)(int);
typedef int (*ctx_set_t)(void *);
static void *g_ctx = NULL;
static ctx_set_t g_ctx_set = NULL;
static unsigned long g_calls = 0;
void spatialtune_green_set(void *ctx) {
  if (!g_ctx_set) {
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (h) g_ctx_set = (ctx_set_t)dlsym(h, "cuCtxSetCurrent");
  }
  g_ctx = ctx;
}
unsigned long spatialtune_green_calls(void) { return g_calls; }
int cudaSetDevice(int device) {
  if (g_ctx && g_ctx_set) {
    g_calls++;
    return g_ctx_set(g_ctx) == 0 ? 0 : 101; /* cudaErrorInvalidDevice */
  }
  set_dev_t real = (set_dev_t)dlvsym(RTLD_NEXT, "cudaSetDevice", "libcudart.so.13");
  if (!real) real = (set_dev_t)dlsym(RTLD_NEXT, "cudaSetDevice");
  return real ? real(device) : 35; /* cudaErrorInsufficientDriver */
}
"""


def green_shim_path(cache_dir: str | None = None) -> str:
    """Path of the compiled cudaSetDevice shim: $SPATIALTUNE_GREEN_SHIM, else built once with cc."""
    from .cubin import cached_build_path

    out, exists = cached_build_path("SPATIALTUNE_GREEN_SHIM", _SHIM_SRC, "green_shim", ".so", cache_dir)
    return out if exists else build_green_shim(out)


def build_green_shim(out: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    cc = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory(prefix="spatialtune-shim-") as d:
        src = os.path.join(d, "shim.c")
        with open(src, "w") as f:
            f.write(_SHIM_SRC)
        tmp = out + f".{os.getpid()}.tmp"
        try:
            r = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", tmp, src, "-ldl"], capture_output=True,
                               text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DeviceError(f"cannot build the green-context shim with {cc}: {e}") from None
        if r.returncode != 0:
            raise DeviceError(f"cannot build the green-context shim: {(r.stderr or '').strip()[:200]}")
        os.replace(tmp, out)
    return out


def _loaded_shim():
    try:
        lib = ctypes.CDLL(None)
        lib.spatialtune_green_set.argtypes = [ctypes.c_void_p]
        lib.spatialtune_green_calls.restype = ctypes.c_ulong
        return lib
    except (AttributeError, OSError):
        return None


# ---------------------------------------------------------------- loading and guarding kernels


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


# ---------------------------------------------------------------- vendor baseline (torch / cuBLAS)

VENDOR_OPS = ("matmul", "dense", "batch_matmul")


def measure_torch(workload: dict, settings, seed: int) -> dict:
    """The vendor baseline in this measuring worker, under its share: torch's matmul (cuBLAS).

    Runs in the same worker process as the candidates, so the MPS percentage (the process's client
    connection) or the green context applies: the green context is current for the CUDA runtime
    that torch calls through (the ``cudaSetDevice`` shim keeps it current, the way torch's own
    ``GreenContext.set_context`` does with ``cuCtxSetCurrent``), and it is checked to be still
    current after the baseline ran. fp32 with TF32 disabled. The output is checked against the
    float64 numpy reference like a kernel's, then timed with CUDA events: warm-up, then the median
    of ``settings.repeat`` repeats of at least ``settings.min_repeat_ms`` each.

    Returns MeasureResult-like fields plus ``impl``; status ``unavailable`` when this Python has
    no torch with CUDA (the run goes on without a baseline).
    """
    import time as _time

    import numpy as np

    from .ops import TOLERANCE, relative_error
    from .spec import Workload

    w = Workload.from_dict(workload)
    if w.op not in VENDOR_OPS:
        from .errors import ConfigError

        raise ConfigError(f"no cuBLAS baseline for {w.op} (only {', '.join(VENDOR_OPS)})")
    try:
        import torch
    except Exception as e:  # ImportError, or a broken install that fails at import
        return {"status": "unavailable", "error": f"torch cannot be imported here: {type(e).__name__}: {e}"}
    if not torch.cuda.is_available():
        return {"status": "unavailable", "error": f"torch {torch.__version__} sees no CUDA device"}
    from . import runner as _runner

    seen = _runner._state.get("seen")
    shim = _state["green"][3] if _state["green"] is not None else None
    calls0 = int(shim.spatialtune_green_calls()) if shim is not None else None
    t0 = _time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if torch.backends.cuda.matmul.allow_tf32:
        return {"status": "runtime_error", "error": "torch did not turn TF32 off"}
    impl = f"torch {torch.__version__} (CUDA {torch.version.cuda}) matmul, cuBLAS, fp32 without TF32"
    op, p = w.operator, w.params
    rng = np.random.default_rng(seed)
    xs = op.random_inputs(p, w.dtype, rng)
    ref = op.reference(p, xs)
    try:
        dev = torch.device("cuda", 0)
        a, b = (torch.from_numpy(np.ascontiguousarray(x)).to(dev) for x in xs)
        if w.op == "dense":
            b = b.t()
        elif w.op == "batch_matmul" and p.get("transpose_b"):
            b = b.transpose(1, 2)
        out_dt = torch.from_numpy(np.zeros(0, op.out_dtype(w.dtype))).dtype
        if out_dt != a.dtype:
            return {"status": "unsupported", "impl": impl,
                    "error": f"{w.dtype} in, {op.out_dtype(w.dtype)} out: torch's matmul has no such cuBLAS call"}
        out = torch.full(tuple(op.output_shape(p)), float("nan"), dtype=out_dt, device=dev)

        def fn():
            torch.matmul(a, b, out=out)

        fn()
        torch.cuda.synchronize()
        check_green_current()
        err = relative_error(out.cpu().numpy(), ref)
        # what torch reads as the SM count (MPS lowers it; a green context does not: its SMs are granted_units)
        res = {"granted_units": seen, "rel_err": err, "impl": impl,
               "torch_sms": int(torch.cuda.get_device_properties(dev).multi_processor_count)}
        if not err <= TOLERANCE[w.dtype]:
            return res | {"status": "wrong_result", "run_s": _time.perf_counter() - t0,
                          "error": f"relative error {err:.3g} exceeds {TOLERANCE[w.dtype]:g} against the float64 "
                                   f"reference"}
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def timed(n: int) -> float:
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / n

        once = timed(3)  # warm-up (cuBLAS picks its kernel, the allocator settles) and a first estimate
        number = max(1, int(np.ceil(settings.min_repeat_ms / 1e3 / max(once, 1e-7))))
        timed(number)
        times = [timed(number) for _ in range(settings.repeat)]
        check_green_current()
    except DeviceError:
        raise  # the green context was lost: the parent sees a failed call, not a baseline of the whole GPU
    except Exception as e:
        die_if_poisoned(e)
        return {"status": "runtime_error", "error": f"{type(e).__name__}: {str(e)[:300]}", "impl": impl,
                "run_s": _time.perf_counter() - t0}
    res |= {"status": "ok", "times": times, "median_s": float(np.median(times)), "number": number,
            "run_s": _time.perf_counter() - t0}
    if shim is not None:
        res["green_shim_calls"] = int(shim.spatialtune_green_calls()) - calls0
    del a, b, out
    torch.cuda.empty_cache()
    return res
