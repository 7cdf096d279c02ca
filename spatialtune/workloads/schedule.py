"""Schedules of a workload: the identity of a scheduled kernel and the replay of a stored trace.

A kernel is identified by the structural hash of its scheduled IRModule (:func:`mod_hash`); a
config is stored as its MetaSchedule trace (:func:`trace_to_json`) and turned back into a
schedule by :func:`apply_trace`, the one replay used by the search, bundles, lookup and interop.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

log = logging.getLogger(__name__)


def mod_hash(mod) -> str:
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod) & 0xFFFFFFFFFFFFFFFF:016x}"


def trace_to_json(trace) -> str:
    import tvm

    return tvm.ir.save_json(trace.as_json())


# TVM registers tensor intrinsics per target family in submodules of tvm.s_tir.tensor_intrin;
# importing the package registers all of them, 15-35 s on 2 cores, 12 s of it the CUDA ones.
_INTRIN_MODULES = {"cuda": ("cuda",)}
_ALL_INTRINS = ("cuda", "x86", "arm_cpu", "rocm", "hexagon", "riscv_cpu")
_LLVM_INTRINS = {"x86_64": ("x86",), "amd64": ("x86",), "i686": ("x86",), "aarch64": ("arm_cpu",),
                 "arm64": ("arm_cpu",), "riscv64": ("riscv_cpu",)}


def intrinsic_families(target: dict | str | None) -> tuple[str, ...]:
    """The tensor-intrinsic families the schedules of ``target`` (a target dict or just its kind;
    ``None``: any target) can name. An llvm target compiles for its ``mtriple``, or for this host
    without one: the x86 families alone on an x86 host (the Arm ones cost another second at every
    start, most of the import)."""
    if target is None:
        return _ALL_INTRINS
    t = {"kind": target} if isinstance(target, str) else dict(target)
    if t.get("kind") == "llvm":
        arch = str(t.get("mtriple") or "").split("-")[0] or platform.machine().lower()
        return _LLVM_INTRINS.get(arch, ("x86", "arm_cpu", "riscv_cpu"))
    return _INTRIN_MODULES.get(str(t.get("kind")), _ALL_INTRINS)


def ensure_tensor_intrinsics(target: dict | str | None = None) -> None:
    """Register the tensor intrinsics a target's schedules can name (``None``: all of them).

    MetaSchedule's design spaces and traces of tensorized kernels refer to intrinsics by name, so
    they must be registered first. Only the families of ``target`` are imported
    (:func:`intrinsic_families`): a CPU job does not pay for the CUDA intrinsics (0.2 s instead of
    15 s here).
    """
    import importlib
    import sys
    import types

    pkg = "tvm.s_tir.tensor_intrin"
    if pkg not in sys.modules:
        import tvm.s_tir

        # The package's own __init__ imports every family; a bare package object lets us import
        # the submodules we need (their relative imports resolve against its __path__).
        stub = types.ModuleType(pkg)
        stub.__path__ = [str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")]
        stub.__package__ = pkg
        sys.modules[pkg] = stub
    for name in intrinsic_families(target):
        try:
            importlib.import_module(f"{pkg}.{name}")
        except Exception as e:  # a family this TVM build lacks (e.g. no LLVM for arm)
            log.debug("tensor intrinsics %s not registered: %s", name, e)


def apply_trace(workload, trace_json: str):
    """A Schedule of ``workload`` with the stored trace ``trace_json`` replayed on it.

    Tries without the tensor intrinsics first: only traces of tensorized kernels need them, and
    importing them costs tens of seconds. Raises what TVM raises when the trace does not replay
    (a trace of another TVM version).
    """
    import tvm
    from tvm.s_tir import Schedule, Trace

    trace = tvm.ir.load_json(trace_json)
    try:
        sch = Schedule(workload.ir_module())
        Trace.apply_json_to_schedule(trace, sch)
        return sch
    except Exception as first:  # most likely an intrinsic that is not registered yet
        log.debug("trace replay without tensor intrinsics failed (%s); importing them", first)
    ensure_tensor_intrinsics(None)
    sch = Schedule(workload.ir_module())
    Trace.apply_json_to_schedule(trace, sch)
    return sch
