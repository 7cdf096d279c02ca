"""GPU neighbours: a separate process on the rest of the device, publishing its own throughput.

- ``compute``: an FMA-bound kernel (8 flops per inner step, 256 threads a block), GFLOP/s;
- ``memory``: a grid-stride float4 copy between two 512 MiB buffers, GB/s read + written;
- ``tenant:WORKLOAD``: a tuned TVM kernel of another workload in a loop (register it with
  :func:`register_tenant`, or list it in the JSON file named by ``$SPATIALTUNE_TENANTS``), GFLOP/s.

"The rest of the device" depends on the partition: an MPS client with the complementary
percentage (100 % when the measured share is the whole GPU), a green context on the SMs the
measured share does not hold (a split of the same size taken the same way, keeping the
remainder), or with no partition simply another process. The neighbour kernels come from a small
CUDA source compiled once to a cubin (:func:`neighbour_cubin_path`), so the neighbour needs only
cuda-bindings, not torch.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import sys
import time

from ..errors import ConfigError, DeviceError
from .base import PROGRESS_SIZE, ProcessNeighbour, publish

log = logging.getLogger(__name__)

KINDS = ("compute", "memory")

NEIGHBOUR_CU = r"""
extern "C" __global__ void fma_loop(float* out, int iters) {
  float a = threadIdx.x * 1e-3f, b = 1.0001f, c = 0.9999f, d = blockIdx.x * 1e-3f;
  for (int i = 0; i < iters; ++i) { a = a * b + c; d = d * c + b; a = a * c + d; d = d * b + a; }
  out[blockIdx.x * blockDim.x + threadIdx.x] = a + d;
}
extern "C" __global__ void copy4(const float4* __restrict__ src, float4* __restrict__ dst, unsigned long long n) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x)
    dst[i] = src[i];
}
"""

FMA_BLOCKS, FMA_THREADS, FMA_ITERS = 1056, 256, 4000
COPY_BYTES = 512 << 20

_tenants: dict[str, dict] = {}


def register_tenant(name: str, workload: dict, artifact: str, cubin: str | None) -> None:
    """Make ``tenant:name`` run this built kernel (a tuned config of ``workload``)."""
    _tenants[name] = {"workload": workload, "artifact": artifact, "cubin": cubin}


def tenant_entry(name: str) -> dict:
    if name in _tenants:
        return _tenants[name]
    path = os.environ.get("SPATIALTUNE_TENANTS")
    if path and os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
        if name in table:
            return table[name]
    raise ConfigError(f"interference tenant:{name}: no built kernel of {name!r} is registered "
                      "(bundle run registers the best 100% config of each bundled workload)")


def neighbour_cubin_path(arch: str = "sm_90", cache_dir: str | None = None) -> str:
    from ..cuda.cubin import cached_build_path, compile_source

    out, exists = cached_build_path("SPATIALTUNE_NEIGHBOUR_CUBIN", NEIGHBOUR_CU, "neighbour", f"-{arch}.cubin",
                                    cache_dir)
    if not exists:
        compile_source(NEIGHBOUR_CU, out, arch)
    return out


class GpuNeighbour(ProcessNeighbour):
    def __init__(self, spec: str, partition=None, cubin: str | None = None):
        if spec in KINDS:
            unit = "GFLOP/s" if spec == "compute" else "GB/s"
        elif spec.startswith("tenant:") and len(spec) > 7:
            unit = "GFLOP/s"
        else:
            raise ConfigError(f"unknown GPU interference {spec!r} (known: none, compute, memory, tenant:WORKLOAD)")
        super().__init__(spec, unit)
        self.spec, self.partition, self.cubin = spec, partition, cubin

    def config(self, share) -> tuple[dict, dict[str, str]]:
        cfg: dict = {"spec": self.spec, "partition": getattr(self.partition, "kind", "none")}
        env: dict[str, str] = {}
        if self.spec.startswith("tenant:"):
            cfg["tenant"] = tenant_entry(self.spec[len("tenant:"):])
        else:
            cfg["cubin"] = self.cubin or neighbour_cubin_path()
        part = self.partition
        if part is not None and share is not None and part.kind in ("mps", "green"):
            rest = part.neighbour_share(share)
            if part.kind == "mps":
                env.update(part.worker_env(rest))
            elif share.units < share.total:
                cfg["green_beside"] = share.units  # take the SMs a split of this size leaves over
                if self.spec.startswith("tenant:"):
                    env.update(part.worker_env(share))  # the cudaSetDevice shim, for TVM
            cfg["neighbour_units"] = rest.units if rest is not None else None
        return cfg, env

    def command(self, share):
        cfg, env = self.config(share)
        return [sys.executable, "-m", "spatialtune.neighbours.gpu", json.dumps(cfg)], env, None


# ---------------------------------------------------------------- the neighbour process


def _neighbour_main(cfg: dict, path: str) -> None:
    from ..cuda import driver as rt
    from ..cuda.green import create_green_ctx, enter_green

    cu = rt.driver()
    rt.ck(cu.cuInit(0), "cuInit")
    dev = rt.ck(cu.cuDeviceGet(0), "cuDeviceGet")
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), PROGRESS_SIZE)
    beside = cfg.get("green_beside")
    if cfg["spec"].startswith("tenant:"):
        if beside:
            enter_green(beside, complement=True)
        return _tenant_loop(cfg["tenant"], mm)
    if beside:
        ctx, _, _ = create_green_ctx(beside, complement=True)
    else:
        ctx = rt.ck(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
    rt.ck(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    import numpy as np

    mod = rt.ck(cu.cuModuleLoadData(open(cfg["cubin"], "rb").read()), "cuModuleLoadData")
    stream = rt.ck(cu.cuStreamCreate(0), "cuStreamCreate")
    keep = []

    def args(*vals):
        arrs = [np.array([v[0]], dtype=v[1]) for v in vals]
        keep.append(arrs)
        return np.array([a.ctypes.data for a in arrs], dtype=np.uint64)

    if cfg["spec"] == "compute":
        fn = rt.ck(cu.cuModuleGetFunction(mod, b"fma_loop"), "cuModuleGetFunction")
        out = rt.ck(cu.cuMemAlloc(FMA_BLOCKS * FMA_THREADS * 4), "cuMemAlloc")
        a = args((int(out), np.uint64), (FMA_ITERS, np.int32))
        grid, per_launch, per_sync = FMA_BLOCKS, FMA_BLOCKS * FMA_THREADS * FMA_ITERS * 8 / 1e9, 4
    else:
        fn = rt.ck(cu.cuModuleGetFunction(mod, b"copy4"), "cuModuleGetFunction")
        src = rt.ck(cu.cuMemAlloc(COPY_BYTES), "cuMemAlloc")
        dst = rt.ck(cu.cuMemAlloc(COPY_BYTES), "cuMemAlloc")
        rt.ck(cu.cuMemsetD32(src, 0x3F800000, COPY_BYTES // 4), "cuMemsetD32")
        a = args((int(src), np.uint64), (int(dst), np.uint64), (COPY_BYTES // 16, np.uint64))
        grid, per_launch, per_sync = 132 * 8, 2 * COPY_BYTES / 1e9, 8
    work = 0.0
    while True:
        for _ in range(per_sync):
            rt.ck(cu.cuLaunchKernel(fn, grid, 1, 1, 256, 1, 1, 0, stream, a.ctypes.data, 0), "cuLaunchKernel")
        rt.ck(cu.cuStreamSynchronize(stream), "cuStreamSynchronize")
        work += per_sync * per_launch
        publish(mm, work)


def _tenant_loop(entry: dict, mm) -> None:
    import numpy as np

    from ..cuda.tvm_runtime import import_tvm, load_module
    from ..workloads.spec import Workload

    tvm = import_tvm()
    w = Workload.from_dict(entry["workload"])
    mod = load_module(entry["artifact"], entry.get("cubin"))
    dev = tvm.cuda(0)
    xs = w.random_inputs(np.random.default_rng(1))
    args = [tvm.runtime.tensor(x, dev) for x in xs]
    outs = [tvm.runtime.tensor(np.zeros_like(o), dev) for o in w.poisoned_outputs()]
    f = mod._mod["main"]
    gflop = w.flops / 1e9
    work, n = 0.0, 1
    while True:
        t0 = time.monotonic()
        for _ in range(n):
            f(*args, *outs)
        dev.sync()
        work += n * gflop
        publish(mm, work)
        if time.monotonic() - t0 < 0.005 and n < 4096:
            n *= 2  # publish every few ms, whatever the kernel's length


def calibrate_green(sms: list[int], cubin: str | None = None, reps: int = 7) -> list[dict]:
    """Time the SM-bound FMA kernel (1056 blocks) on green contexts of ``sms`` SMs (the whole
    device on the primary context): the slowdowns should follow the SM counts. Returns rows."""
    import numpy as np

    from ..cuda import driver as rt
    from ..cuda.green import create_green_ctx

    cu = rt.driver()
    rt.ck(cu.cuInit(0), "cuInit")
    dev = rt.ck(cu.cuDeviceGet(0), "cuDeviceGet")
    total = int(rt.ck(cu.cuDeviceGetAttribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev)))
    blob = open(cubin or neighbour_cubin_path(), "rb").read()
    rows = []
    for n in sms:
        green = None
        if n >= total:
            ctx, got = rt.ck(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain"), total
        else:
            ctx, green, got = create_green_ctx(n)
        rt.ck(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        mod = rt.ck(cu.cuModuleLoadData(blob), "cuModuleLoadData")
        fn = rt.ck(cu.cuModuleGetFunction(mod, b"fma_loop"), "cuModuleGetFunction")
        out = rt.ck(cu.cuMemAlloc(FMA_BLOCKS * FMA_THREADS * 4), "cuMemAlloc")
        stream = rt.ck(cu.cuStreamCreate(0), "cuStreamCreate")
        a_out, a_it = np.array([int(out)], np.uint64), np.array([FMA_ITERS * 5], np.int32)
        args = np.array([a_out.ctypes.data, a_it.ctypes.data], np.uint64)
        e0, e1 = rt.ck(cu.cuEventCreate(0), "cuEventCreate"), rt.ck(cu.cuEventCreate(0), "cuEventCreate")
        ts = []
        for _ in range(reps):
            rt.ck(cu.cuEventRecord(e0, stream), "cuEventRecord")
            rt.ck(cu.cuLaunchKernel(fn, FMA_BLOCKS, 1, 1, FMA_THREADS, 1, 1, 0, stream, args.ctypes.data, 0),
                  "cuLaunchKernel")
            rt.ck(cu.cuEventRecord(e1, stream), "cuEventRecord")
            rt.ck(cu.cuEventSynchronize(e1), "cuEventSynchronize")
            ts.append(rt.ck(cu.cuEventElapsedTime(e0, e1), "cuEventElapsedTime"))
        rows.append({"sms_asked": n, "sms": got, "ms": float(np.median(ts[1:]))})
        cu.cuMemFree(out)
        cu.cuModuleUnload(mod)
        cu.cuStreamDestroy(stream)
        if green is not None:
            cu.cuGreenCtxDestroy(green)
    base = next((r["ms"] for r in rows if r["sms"] == total), rows[0]["ms"])
    for r in rows:
        r["slowdown"], r["ideal"] = r["ms"] / base, total / r["sms"]
    return rows


if __name__ == "__main__":
    if sys.argv[1] == "--calibrate":
        rows = calibrate_green([int(x) for x in sys.argv[2].split(",")])
        if len(sys.argv) > 3:
            with open(sys.argv[3], "w") as f:
                json.dump(rows, f)
        for r in rows:
            dev = r["slowdown"] / r["ideal"] - 1
            print(f"CHECK green FMA kernel {r['sms']:>3} SMs: {r['ms']:.3f} ms, slowdown {r['slowdown']:.2f}x vs SM "
                  f"ratio {r['ideal']:.2f}x ({dev:+.0%}) -> {'PASS' if abs(dev) <= 0.15 else 'OFF'} (within 15%)")
        sys.exit(0)
    try:
        _neighbour_main(json.loads(sys.argv[1]), sys.argv[2])
    except DeviceError as e:
        print(f"neighbour: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
