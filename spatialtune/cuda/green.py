"""CUDA green contexts: an exact SM count for one process.

TVM's CUDA runtime calls ``cudaSetDevice`` before most operations, and that makes the device's
primary context current again, which would silently run every kernel on the whole GPU. A green
process therefore starts with a tiny ``LD_PRELOAD`` shim whose ``cudaSetDevice`` makes the green
context current instead (:func:`green_shim_path`); :func:`check_green_current` verifies it.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import tempfile
from typing import Any

from ..errors import DeviceError
from .driver import ck, driver

_state: dict[str, Any] = {"green": None}


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


def current_shim():
    """The loaded shim library of the current green context, or None outside one."""
    return _state["green"][3] if _state["green"] is not None else None
