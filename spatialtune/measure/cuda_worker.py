"""The CUDA side of a measuring worker: apply the share (MPS client or green context) and report
the SMs its kernels can use. Loading kernels and guarding the context: :mod:`spatialtune.cuda`."""

from __future__ import annotations

import logging

from ..cuda.driver import ck, driver
from ..cuda.green import check_green_current, enter_green, leave_green
from ..cuda.tvm_runtime import import_tvm
from ..errors import DeviceError

log = logging.getLogger(__name__)


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
