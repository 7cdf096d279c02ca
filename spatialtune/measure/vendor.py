"""Vendor baselines, measured in the measuring worker under the same share and neighbour as the
candidates: numpy (BLAS) on the CPU, torch's matmul (cuBLAS) on a GPU."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..cuda.green import check_green_current, current_shim
from ..cuda.tvm_runtime import die_if_poisoned
from ..errors import ConfigError, DeviceError

if TYPE_CHECKING:
    from .runner import RunSettings


def measure_numpy(workload: dict, settings: RunSettings, seed: int) -> dict:
    """The vendor baseline on the CPU: numpy (BLAS for the matmuls) with this worker's cores."""
    from ..workloads.spec import Workload
    from . import blas
    from .in_worker import cold_times, granted_units, looped_time, share_cores, warm_up

    w = Workload.from_dict(workload)
    op = w.operator
    rng = np.random.default_rng(seed)
    xs = op.random_inputs(w.params, w.dtype, rng)
    fn = _numpy_impl(w)
    cores = share_cores()
    # After TVM's pool and before BLAS's: each spins on the share's cores for a while after its
    # last call, and numpy timed within 0.1 s of a kernel ran 10x slow (see measure.blas).
    time.sleep(QUIET_S)
    with blas.threads(len(cores) if cores else len(os.sched_getaffinity(0))):
        fn(xs)
        warm_up(lambda: fn(xs), settings.warmup_ms)  # the kernels' warm-up, for a fair start
        # The best of NUMPY_ROUNDS timings, in case the quiet was not long enough: a slow anchor
        # flatters every kernel compared with it.
        best: list[float] | None = None
        for _ in range(NUMPY_ROUNDS):
            if getattr(settings, "cold", False):  # as the kernels are timed under ``cold``
                times = cold_times(lambda: fn(xs), max(1, settings.repeat))
            else:
                times = [looped_time(lambda: fn(xs), settings.min_repeat_ms) for _ in range(settings.repeat)]
            if best is None or np.median(times) < np.median(best):
                best = times
    time.sleep(QUIET_S)  # BLAS's threads go quiet before the next kernel is timed here
    return {"status": "ok", "times": best, "median_s": float(np.median(best)), "granted_units": granted_units()}


NUMPY_ROUNDS = 3
QUIET_S = 0.5  # TVM's pool was quiet 0.3 s after a kernel on the benchmarks' VM


def _numpy_impl(w):
    p = w.params
    if w.op == "matmul":
        return lambda xs: xs[0] @ xs[1]
    if w.op == "dense":
        return lambda xs: xs[0] @ xs[1].T
    if w.op == "batch_matmul":
        return (lambda xs: xs[0] @ xs[1].transpose(0, 2, 1)) if p["transpose_b"] else (lambda xs: xs[0] @ xs[1])
    # Convolutions in the input precision, the way a numpy user would write them (im2col + GEMM).
    from ..workloads.ops import conv_reference

    dw = w.op == "depthwise_conv2d"
    return lambda xs: conv_reference(p, [xs[0].astype(np.float32), xs[1].astype(np.float32)], dw)


# ---------------------------------------------------------------- torch / cuBLAS

VENDOR_OPS = ("matmul", "dense", "batch_matmul")


def measure_torch(workload: dict, settings: RunSettings, seed: int) -> dict:
    """The vendor baseline in this measuring worker, under its share: torch's matmul (cuBLAS).

    Runs in the same worker process as the candidates, so the MPS percentage (the process's client
    connection) or the green context applies: the green context is current for the CUDA runtime
    that torch calls through (the ``cudaSetDevice`` shim keeps it current, the way torch's own
    ``GreenContext.set_context`` does with ``cuCtxSetCurrent``), and it is checked to be still
    current after the baseline ran. fp32 with TF32 disabled; fp16 with fp32 accumulation
    (``allow_fp16_reduced_precision_reduction`` off), its fp16 result widened into the fp32 output
    the workload writes, the copy timed too. The output is checked against the
    float64 numpy reference like a kernel's, then timed with CUDA events: warm-up, then the median
    of ``settings.repeat`` repeats of at least ``settings.min_repeat_ms`` each.

    Returns MeasureResult-like fields plus ``impl``; status ``unavailable`` when this Python has
    no torch with CUDA (the run goes on without a baseline).
    """
    from ..workloads.spec import Workload

    w = Workload.from_dict(workload)
    if w.op not in VENDOR_OPS:
        raise ConfigError(f"no cuBLAS baseline for {w.op} (only {', '.join(VENDOR_OPS)})")
    torch = _import_torch()
    if isinstance(torch, dict):
        return torch
    from .in_worker import granted_units

    seen = granted_units()
    shim = current_shim()
    calls0 = int(shim.spatialtune_green_calls()) if shim is not None else None
    t0 = time.perf_counter()
    if not _torch_exact_matmul(torch):
        return {"status": "runtime_error", "error": "torch did not turn TF32 off"}
    impl = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) matmul, cuBLAS, "
            + ("fp16 in, fp32 accumulation, fp32 out" if w.dtype == "fp16" else "fp32 without TF32"))
    xs = w.operator.random_inputs(w.params, w.dtype, np.random.default_rng(seed))
    ref = w.operator.reference(w.params, xs)
    try:
        call = _torch_call(torch, w, xs)
        if isinstance(call, str):
            return {"status": "unsupported", "impl": impl, "error": call}
        checked, wrong = _torch_check(torch, w, ref, call)
        res = {"granted_units": seen, "impl": impl} | checked
        if wrong:
            return res | {"status": "wrong_result", "run_s": time.perf_counter() - t0, "error": wrong}
        times, number = _time_with_events(torch, call.fn, settings)
        check_green_current()
    except DeviceError:
        raise  # the green context was lost: the parent sees a failed call, not a baseline of the whole GPU
    except Exception as e:
        die_if_poisoned(e)
        return {"status": "runtime_error", "error": f"{type(e).__name__}: {str(e)[:300]}", "impl": impl,
                "run_s": time.perf_counter() - t0}
    res |= {"status": "ok", "times": times, "median_s": float(np.median(times)), "number": number,
            "run_s": time.perf_counter() - t0}
    if shim is not None:
        res["green_shim_calls"] = int(shim.spatialtune_green_calls()) - calls0
    call = None  # free the device memory before empty_cache
    torch.cuda.empty_cache()
    return res


def _import_torch():
    """torch with CUDA, or the ``unavailable`` row saying why not."""
    try:
        import torch
    except Exception as e:  # ImportError, or a broken install that fails at import
        return {"status": "unavailable", "error": f"torch cannot be imported here: {type(e).__name__}: {e}"}
    if not torch.cuda.is_available():
        return {"status": "unavailable", "error": f"torch {torch.__version__} sees no CUDA device"}
    return torch


def _torch_exact_matmul(torch) -> bool:
    """Turns off what would make cuBLAS compute less precisely than the workload; False if TF32 stays on."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # fp16: cuBLAS's fp16 GEMM accumulating in fp32, as the fp16 workloads do (no fp16 reduction)
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    return not torch.backends.cuda.matmul.allow_tf32


@dataclass
class _TorchCall:
    """The workload as one torch call on the device: its operands, its output and the call.

    Holding the tensors here lets the caller drop them all at once before ``empty_cache``."""

    a: object
    b: object
    out: object
    fn: Callable[[], None]


def _torch_call(torch, w, xs) -> _TorchCall | str:
    """The inputs copied to the device and the matmul writing the workload's output, or why torch
    has no such call."""
    op, p = w.operator, w.params
    dev = torch.device("cuda", 0)
    a, b = (torch.from_numpy(np.ascontiguousarray(x)).to(dev) for x in xs)
    if w.op == "dense":
        b = b.t()
    elif w.op == "batch_matmul" and p.get("transpose_b"):
        b = b.transpose(1, 2)
    out_dt = torch.from_numpy(np.zeros(0, op.out_dtype(w.dtype))).dtype
    out = torch.full(tuple(op.output_shape(p)), float("nan"), dtype=out_dt, device=dev)
    if out_dt == a.dtype:
        def fn():
            torch.matmul(a, b, out=out)
    elif a.dtype == torch.float16 and out_dt == torch.float32:
        # fp16 in, fp32 out: cuBLAS's fp16 GEMM (fp32 accumulation, fp16 result) then the
        # widening copy, both timed, as a framework's mixed-precision layer does it
        def fn():
            out.copy_(torch.matmul(a, b))
    else:
        return f"{w.dtype} in, {op.out_dtype(w.dtype)} out: torch's matmul has no such cuBLAS call"
    return _TorchCall(a, b, out, fn)


def _torch_check(torch, w, ref, call: _TorchCall) -> tuple[dict, str | None]:
    """Runs the call once and checks its output against the float64 reference, as a kernel's is:
    the fields to record and what is wrong with the output, if anything."""
    from ..workloads.check import check_output

    call.fn()
    torch.cuda.synchronize()
    check_green_current()
    err, wrong = check_output(call.out.cpu().numpy(), ref, w.dtype)
    # what torch reads as the SM count (MPS lowers it; a green context does not: its SMs are granted_units)
    sms = int(torch.cuda.get_device_properties(call.out.device).multi_processor_count)
    return {"rel_err": err, "torch_sms": sms}, wrong


def _time_with_events(torch, fn: Callable[[], None], settings: RunSettings) -> tuple[list[float], int]:
    """``settings.repeat`` timings of ``fn`` with CUDA events, each of enough calls to last
    ``settings.min_repeat_ms``, after a warm-up; and that number of calls."""
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
    return [timed(number) for _ in range(settings.repeat)], number
