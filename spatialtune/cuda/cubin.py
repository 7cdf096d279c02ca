"""Precompile a TVM CUDA module's source to a cubin on the build side.

TVM 0.27 keeps CUDA source in the exported module and compiles it with NVRTC when the module is
loaded (about 3 s per candidate on the H200 host). The builder calls :func:`compile_cubin_for`
instead, so the runner only loads machine code: the runner's ``tvm_callback_cuda_compile``
returns the cubin whose key (sha256 of the CUDA source, written to ``<cubin>.json``) matches the
source TVM hands it.

nvcc is used where it exists (``/usr/local/cuda/bin/nvcc`` or ``nvcc`` on PATH), NVRTC through
cuda-bindings otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time

from ..errors import DeviceError

log = logging.getLogger(__name__)

NVCC_TIMEOUT_S = 300.0


def source_key(code: str | bytes) -> str:
    if isinstance(code, str):
        code = code.encode()
    return hashlib.sha256(code).hexdigest()


def find_nvcc() -> str | None:
    for cand in (os.environ.get("SPATIALTUNE_NVCC"), "/usr/local/cuda/bin/nvcc", shutil.which("nvcc")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def cuda_source(lib) -> str:
    """The CUDA C++ of a module built by ``tvm.compile`` for a cuda target."""
    mod = getattr(lib, "mod", lib)
    for m in list(mod.imports):
        if getattr(m, "kind", "") == "cuda":
            return m.inspect_source()
    raise DeviceError("the compiled module has no CUDA device code to precompile")


def arch_of(target: dict | None) -> str:
    arch = (target or {}).get("arch") or "sm_90"
    return arch


def compile_source(code: str, out_path: str, arch: str = "sm_90") -> dict:
    """Compile CUDA source to ``out_path`` (a cubin); returns the metadata also written beside it."""
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    t0 = time.perf_counter()
    nvcc = find_nvcc()
    if nvcc:
        compiler = _nvcc(nvcc, code, out_path, arch)
    else:
        compiler = _nvrtc(code, out_path, arch)
    meta = {"source_sha256": source_key(code), "arch": arch, "compiler": compiler,
            "compile_s": round(time.perf_counter() - t0, 3), "bytes": os.path.getsize(out_path)}
    with open(out_path + ".json", "w") as f:
        json.dump(meta, f)
    return meta


def compile_cubin_for(lib, out_path: str, target: dict | None = None) -> str:
    """Builder hook: cubin of ``lib``'s CUDA source at ``out_path``; returns the path."""
    code = cuda_source(lib)
    meta = compile_source(code, out_path, arch_of(target))
    log.debug("cubin %s: %s in %.2f s", os.path.basename(out_path), meta["compiler"], meta["compile_s"])
    return out_path


def compile_ptx(code: str, arch: str = "sm_90") -> str:
    """The PTX of CUDA source for ``arch``: what a check reads to see which instructions (tensor-core
    MMAs, see :mod:`.tensorcore`) a kernel's cubin is built from. nvcc where it exists, else NVRTC."""
    nvcc = find_nvcc()
    if nvcc is None:
        return _nvrtc(code, None, arch)
    with tempfile.TemporaryDirectory(prefix="spatialtune-ptx-") as d:
        src, out = os.path.join(d, "kernel.cu"), os.path.join(d, "kernel.ptx")
        with open(src, "w") as f:
            f.write(code)
        r = subprocess.run([nvcc, "-ptx", f"-arch={arch}", "-O3", "-o", out, src], capture_output=True, text=True,
                           timeout=NVCC_TIMEOUT_S)
        if r.returncode != 0:
            err = (r.stderr or r.stdout).strip().splitlines()
            raise DeviceError(f"nvcc -ptx failed: {err[-1] if err else r.returncode}")
        with open(out) as f:
            return f.read()


def _nvcc(nvcc: str, code: str, out_path: str, arch: str) -> str:
    with tempfile.TemporaryDirectory(prefix="spatialtune-nvcc-") as d:
        src = os.path.join(d, "kernel.cu")
        with open(src, "w") as f:
            f.write(code)
        tmp_out = out_path + ".tmp"
        cmd = [nvcc, "-cubin", f"-arch={arch}", "-O3", "-o", tmp_out, src]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"nvcc did not finish in {NVCC_TIMEOUT_S:.0f} s") from None
        if r.returncode != 0:
            err = (r.stderr or r.stdout).strip().splitlines()
            raise DeviceError(f"nvcc failed: {err[-1] if err else r.returncode}")
        os.replace(tmp_out, out_path)
        ver = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        return "nvcc " + (ver.splitlines()[-1] if ver else "")


def _nvrtc(code: str, out_path: str | None, arch: str) -> str:
    """Compile with NVRTC: the cubin to ``out_path`` (returns the compiler's name), or with
    ``out_path`` None the PTX (returned)."""
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        raise DeviceError("no nvcc and no cuda-bindings (NVRTC): cannot precompile CUDA kernels") from None

    def ck(r):
        err = r[0]
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise DeviceError(f"NVRTC: {err.name}")
        return r[1] if len(r) == 2 else r[1:]

    prog = ck(nvrtc.nvrtcCreateProgram(code.encode(), b"kernel.cu", 0, [], []))
    opts = [f"-arch={arch}".encode(), b"-default-device", b"-std=c++17"]
    inc = _cuda_include_dirs()
    opts += [b"-I" + d.encode() for d in inc]
    r = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    if r[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        size = ck(nvrtc.nvrtcGetProgramLogSize(prog))
        buf = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, buf)
        lines = buf.decode(errors="replace").strip().splitlines()
        raise DeviceError(f"NVRTC compile failed: {lines[-1] if lines else r[0].name}")
    if out_path is None:
        size = ck(nvrtc.nvrtcGetPTXSize(prog))
        buf = b" " * size
        ck((nvrtc.nvrtcGetPTX(prog, buf)[0], None))
        return buf.rstrip(b"\0").decode()
    size = ck(nvrtc.nvrtcGetCUBINSize(prog))
    buf = b" " * size
    ck((nvrtc.nvrtcGetCUBIN(prog, buf)[0], None))
    with open(out_path, "wb") as f:
        f.write(buf)
    major, minor = ck(nvrtc.nvrtcVersion())
    return f"nvrtc {major}.{minor}"


def _cuda_include_dirs() -> list[str]:
    out = []
    for d in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        if d and os.path.isdir(os.path.join(d, "include")):
            out.append(os.path.join(d, "include"))
    try:  # the pip CUDA runtime headers (cuda/std/* for TVM's NVRTC prelude)
        import nvidia.cuda_runtime as rt  # type: ignore

        out.append(os.path.join(os.path.dirname(rt.__file__), "include"))
    except Exception:
        pass
    return out


def check_cubin(path: str, arch: str = "sm_90") -> str:
    """Sanity check of a cubin: cuobjdump's listing where present, else the ELF header.

    Returns a short description; raises DeviceError when it is not a CUDA ELF for ``arch``.
    """
    data = open(path, "rb").read(64)
    if data[:4] != b"\x7fELF":
        raise DeviceError(f"{path} is not an ELF file")
    # CUDA cubins are ELF64 with machine EM_CUDA (190).
    machine = int.from_bytes(data[18:20], "little")
    if machine != 190:
        raise DeviceError(f"{path} is an ELF for machine {machine}, not CUDA (190)")
    tool = shutil.which("cuobjdump") or ("/usr/local/cuda/bin/cuobjdump"
                                          if os.access("/usr/local/cuda/bin/cuobjdump", os.X_OK) else None)
    if tool:
        r = subprocess.run([tool, "--list-elf", path], capture_output=True, text=True, timeout=60)
        text = (r.stdout + r.stderr).strip()
        if r.returncode != 0 or arch not in text:
            # cuobjdump names the arch in the ELF listing; sass dump as a second opinion
            r2 = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True, timeout=60)
            if r2.returncode != 0 or arch not in r2.stdout:
                raise DeviceError(f"cuobjdump does not see {arch} code in {path}: {text[:200]}")
            return f"cuobjdump: {arch} sass ok"
        return f"cuobjdump: {text.splitlines()[0][:120]}"
    # ELF e_flags hold the SM number: in the low byte (older ABI) or the second byte (ABI 8,
    # CUDA 13); ptxas also leaves "-arch sm_NN" in the .note.nv.tkinfo note.
    blob = open(path, "rb").read()
    flags = int.from_bytes(blob[48:52], "little")
    want = int(arch.split("_")[1].rstrip("a"))
    if want in (flags & 0xFF, (flags >> 8) & 0xFF) or f"-arch {arch}".encode() in blob:
        return f"elf: CUDA {arch}"
    raise DeviceError(f"{path}: ELF flags {flags:#x} do not say {arch}")


def cached_build_path(env_var: str, source: str, name: str, suffix: str, cache_dir: str | None = None) -> tuple[str, bool]:
    """Where a helper binary built from ``source`` lives: ``$env_var`` if it names an existing file,
    else a per-source file in the user's cache. Returns (path, exists)."""
    env = os.environ.get(env_var)
    if env and os.path.exists(env):
        return env, True
    key = hashlib.sha256(source.encode()).hexdigest()[:12]
    d = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "spatialtune")
    out = os.path.join(d, f"{name}-{key}{suffix}")
    return out, os.path.exists(out)
