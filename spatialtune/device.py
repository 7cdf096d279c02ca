"""What a measurement was taken on, and the TVM target that compiles for it.

Records are keyed by the device id, so results from another CPU model, GPU model, driver, TVM
version or instruction set are never mixed with these.

Targets match the hardware (:func:`target_for`, the one place a target is made):

- CPU: LLVM's name of the host CPU (``tvm.target.codegen.llvm_get_system_cpu()``, e.g.
  ``znver4`` or ``sapphirerapids``) as ``mcpu``: without it LLVM compiles for generic x86-64 (no
  AVX, no FMA), and ``"native"`` is rejected by TVM 0.27. Vector features that CPU model has but
  this machine does not report (a hypervisor can hide AVX-512) are turned off in ``mattr``.
  ``num-cores`` is the share's granted cores.
- CUDA: ``arch`` from the device's compute capability.

Both are recorded with the device (``arch``, ``mattr``), and overridable (``--mcpu``, ``--arch``).
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import asdict, dataclass

from .errors import ConfigError, DeviceError

# LLVM feature names we check against what the kernel reports (/proc/cpuinfo flags, which spell
# some with an underscore: avx512_bf16, avx512_vnni)
VECTOR_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl",
                   "avx512vnni", "avx512bf16", "avx512fp16", "avx512ifma", "avx512vbmi", "amx-tile", "amx-int8",
                   "amx-bf16")


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cpu" | "cuda"
    name: str
    units: int  # cores or SMs of the whole device
    unit: str  # "core" | "SM"
    driver: str = ""
    arch: str = ""  # CPU: LLVM's CPU name (mcpu); CUDA: sm_XY
    tvm_version: str = ""
    uuid: str = ""
    mattr: str = ""  # CPU: LLVM features turned off because this machine lacks them ("-avx512f,...")

    @property
    def id(self) -> str:
        # The UUID is recorded but not part of the id: a config tuned on one H100 is valid on
        # another H100 with the same driver and TVM; a different model or stack is not.
        parts = [self.kind, self.name, str(self.units), self.unit, self.driver, self.arch, self.tvm_version]
        if self.mattr:  # only when set, so the ids of earlier records stay what they were
            parts.append(self.mattr)
        return f"{self.kind}-{hashlib.sha256('|'.join(parts).encode()).hexdigest()[:12]}"

    def to_dict(self) -> dict:
        return asdict(self) | {"id": self.id}

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceInfo":
        return cls(**{k: d.get(k) or "" for k in ("kind", "name", "unit", "driver", "arch", "tvm_version", "uuid",
                                                  "mattr")}, units=int(d["units"]))


def target_for(device: DeviceInfo | dict, units: int | None = None) -> dict:
    """The TVM target for ``device`` (a DeviceInfo or a device row), as the JSON dict TVM 0.27
    accepts (its string form raises). ``units``: the cores a CPU share was granted (default:
    every core of the device); a GPU target does not depend on the share."""
    d = device if isinstance(device, dict) else device.to_dict()
    if d["kind"] == "cpu":
        t = {"kind": "llvm", "num-cores": int(units or d["units"])}
        if d.get("arch") and d["arch"] not in ("x86_64", "aarch64", "arm64", "generic"):
            t["mcpu"] = d["arch"]
        if d.get("mattr"):
            t["mattr"] = d["mattr"].split(",")
        return t
    if d["kind"] == "cuda":
        if not d.get("arch"):
            raise ConfigError(f"device {d.get('id', d['name'])} has no CUDA arch recorded: pass --arch")
        return {"kind": "cuda", "arch": d["arch"], "max_threads_per_block": 1024,
                "max_shared_memory_per_block": 49152, "thread_warp_size": 32}
    raise ConfigError(f"unknown device kind {d['kind']!r} (known: cpu, cuda)")


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


def cpu_flags() -> set[str]:
    """The CPU features the kernel reports, in LLVM's spelling where it differs."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return {x.replace("_", "") if x.startswith("avx512_") else x.replace("_", "-")
                            for x in line.split(":", 1)[1].split()}
    except OSError:
        pass
    return set()


def host_llvm_cpu() -> str:
    """LLVM's name for this machine's CPU, or the bare architecture when TVM has no LLVM
    (a runtime-only TVM)."""
    try:
        from tvm.target import codegen

        return str(codegen.llvm_get_system_cpu())
    except Exception:
        return platform.machine()


def masked_features(mcpu: str) -> str:
    """``mattr`` turning off the vector features ``mcpu`` implies but this machine does not report."""
    flags = cpu_flags()
    if not flags or platform.machine() not in ("x86_64", "AMD64"):
        return ""
    try:
        import tvm
        from tvm.target import codegen

        implied = set(codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": mcpu})))
    except Exception:
        return ""
    return ",".join(f"-{f}" for f in VECTOR_FEATURES if f in implied and f not in flags)


def check_mcpu(mcpu: str) -> str:
    try:
        from tvm.target import codegen

        ok = bool(codegen.llvm_is_valid_cpu(mcpu, codegen.llvm_get_system_triple()))
    except Exception:
        return mcpu
    if not ok:
        raise ConfigError(f"--mcpu {mcpu!r} is not a CPU LLVM knows for this machine (this one is "
                          f"{host_llvm_cpu()!r})")
    return mcpu


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def detect_cpu(mcpu: str | None = None) -> DeviceInfo:
    """This machine's CPU (the cores this process may use) and the LLVM CPU to compile for."""
    arch = check_mcpu(mcpu) if mcpu else host_llvm_cpu()
    return DeviceInfo(kind="cpu", name=cpu_model(), units=len(usable_cores()), unit="core",
                      driver=platform.system() + " " + platform.release().split("-")[0], arch=arch,
                      tvm_version=tvm_version(), mattr=masked_features(arch))


def detect_cuda(index: int = 0, arch: str | None = None) -> DeviceInfo:
    """The GPU at ``index`` through NVML and the driver API; DeviceError in one line when absent.
    ``arch`` overrides the compute capability's sm_XY."""
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
                      arch=arch or f"sm_{major}{minor}", tvm_version=tvm_version(), uuid=uuid)


def cuda_sm_count(index: int = 0) -> int:
    from .cuda.driver import sm_count

    return sm_count(index)


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def describe_machine() -> str:
    """One line naming this machine for a benchmark's output: CPU model, cores this process may
    use, LLVM's name for the CPU, OS, Python and TVM."""
    return (f"{cpu_model()}, {len(usable_cores())} cores usable (LLVM cpu {host_llvm_cpu()}), {platform.system()} "
            f"{platform.release().split('-')[0]}, Python {platform.python_version()}, TVM {tvm_version() or '?'}")
