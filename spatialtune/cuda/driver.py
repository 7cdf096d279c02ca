"""The CUDA driver API through cuda-bindings, with one-line errors."""

from __future__ import annotations

from ..errors import DeviceError


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


def sm_count(index: int = 0) -> int:
    """SMs of CUDA device ``index``; DeviceError in one line without a driver or device."""
    try:
        cu = driver()
    except DeviceError:
        raise DeviceError("cuda-bindings is not installed: pip install cuda-bindings") from None
    err, = cu.cuInit(0)[:1]
    if err != cu.CUresult.CUDA_SUCCESS:
        raise DeviceError(f"CUDA driver did not initialise ({err.name})")
    err, dev = cu.cuDeviceGet(index)
    if err != cu.CUresult.CUDA_SUCCESS:
        raise DeviceError(f"no CUDA device {index} ({err.name})")
    err, n = cu.cuDeviceGetAttribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev)
    if err != cu.CUresult.CUDA_SUCCESS:
        raise DeviceError(f"cannot read the SM count ({err.name})")
    return int(n)
