"""What a measurement was taken on. Records are keyed by the device id, so results from another
CPU model, GPU model, driver or TVM version are never mixed with these."""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import asdict, dataclass

from .errors import DeviceError


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cpu" | "cuda"
    name: str
    units: int  # cores or SMs of the whole device
    unit: str  # "core" | "SM"
    driver: str = ""
    arch: str = ""
    tvm_version: str = ""
    uuid: str = ""

    @property
    def id(self) -> str:
        # The UUID is recorded but not part of the id: a config tuned on one H100 is valid on
        # another H100 with the same driver and TVM; a different model or stack is not.
        canon = "|".join([self.kind, self.name, str(self.units), self.unit, self.driver, self.arch, self.tvm_version])
        return f"{self.kind}-{hashlib.sha256(canon.encode()).hexdigest()[:12]}"

    def to_dict(self) -> dict:
        return asdict(self) | {"id": self.id}

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceInfo":
        return cls(**{k: d.get(k, "") for k in ("kind", "name", "unit", "driver", "arch", "tvm_version", "uuid")},
                   units=int(d["units"]))


def tvm_version() -> str:
    try:
        from importlib.metadata import version

        return version("apache-tvm")
    except Exception:  # a runtime-only TVM carried to a GPU host has no dist metadata
        return ""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def detect_cpu() -> DeviceInfo:
    return DeviceInfo(kind="cpu", name=cpu_model(), units=len(usable_cores()), unit="core",
                      driver=platform.system() + " " + platform.release().split("-")[0], arch=platform.machine(),
                      tvm_version=tvm_version())


def detect_cuda(index: int = 0) -> DeviceInfo:
    """The GPU at ``index`` through NVML and the driver API; DeviceError in one line when absent."""
    try:
        import pynvml
    except ImportError:
        raise DeviceError("no NVIDIA GPU support: install nvidia-ml-py") from None
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        raise DeviceError(f"no NVIDIA GPU on this machine (NVML: {e})") from None
    try:
        if pynvml.nvmlDeviceGetCount() <= index:
            raise DeviceError(f"no NVIDIA GPU {index} on this machine")
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = _s(pynvml.nvmlDeviceGetName(h))
        uuid = _s(pynvml.nvmlDeviceGetUUID(h))
        driver = _s(pynvml.nvmlSystemGetDriverVersion())
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
    finally:
        pynvml.nvmlShutdown()
    return DeviceInfo(kind="cuda", name=name, units=cuda_sm_count(index), unit="SM", driver=driver,
                      arch=f"sm_{major}{minor}", tvm_version=tvm_version(), uuid=uuid)


def cuda_sm_count(index: int = 0) -> int:
    try:
        from cuda.bindings import driver as cu
    except ImportError:
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


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)
