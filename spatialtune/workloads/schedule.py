"""Schedules of a workload: the identity of a scheduled kernel and the replay of a stored trace.

A kernel is identified by the structural hash of its scheduled IRModule (:func:`mod_hash`); a
config is stored as its MetaSchedule trace (:func:`trace_to_json`) and turned back into a
schedule by :func:`apply_trace`, the one replay used by the search, bundles, lookup and interop.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def mod_hash(mod) -> str:
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod) & 0xFFFFFFFFFFFFFFFF:016x}"


def trace_to_json(trace) -> str:
    import tvm

    return tvm.ir.save_json(trace.as_json())


def ensure_tensor_intrinsics() -> None:
    """Register TVM's tensor intrinsics (traces of tensorized kernels name them). Slow, ~35 s on
    2 cores, once per process."""
    import tvm.s_tir.tensor_intrin  # noqa: F401


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
    ensure_tensor_intrinsics()
    sch = Schedule(workload.ir_module())
    Trace.apply_json_to_schedule(trace, sch)
    return sch
