"""Export a TVM library whose CUDA modules hold cubins, not CUDA source.

A module built by ``tvm.compile`` or ``relax.build`` for a cuda target keeps its kernels as CUDA
C++ (format ``cuda``), and TVM 0.27's CUDA runtime compiles that at load through
``tvm_callback_cuda_compile``: a GPU host with a runtime-only TVM and no NVRTC cannot load it, and
one that can pays seconds per load. For a single kernel the measuring worker answers that
callback with a cubin shipped beside the module (:mod:`.tvm_runtime`); a whole model is one
exported library with several CUDA modules, so it is exported self-contained instead:
:func:`export_with_cubins` packs the library's imports as ``export_library`` does, but each CUDA
module's payload is rewritten to format ``cubin`` with the machine code compiled here
(:func:`.cubin.compile_source`), which the runtime hands to ``cuModuleLoadData`` as it is.

The payload layout is TVM's serialisation of a CUDA module (format string, function table, code);
it is parsed field by field and a layout that does not add up is an error, never a guess.
"""

from __future__ import annotations

import os
import struct
import tempfile

from ..errors import DeviceError
from .cubin import compile_source

CUDA_KIND = b"cuda"
SOURCE_FORMAT = b"cuda"
BINARY_FORMAT = b"cubin"


class _Reader:
    """TVM's binary stream: little-endian u64 lengths before strings and vectors."""

    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos

    def u64(self) -> int:
        if self.pos + 8 > len(self.data):
            raise DeviceError("CUDA module payload ends early")
        (v,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return v

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise DeviceError("CUDA module payload ends early")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def bytes_(self) -> bytes:
        return self.raw(self.u64())


def _string(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def split_cuda_payload(payload: bytes) -> tuple[bytes, bytes, bytes]:
    """(format, function table as serialised, code) of a CUDA module's payload."""
    r = _Reader(payload)
    fmt = r.bytes_()
    start = r.pos
    for _ in range(r.u64()):  # name -> FunctionInfo(name, arg types, launch tags, extra tags)
        r.bytes_()
        r.bytes_()
        r.raw(4 * r.u64())
        for _ in range(r.u64()):
            r.bytes_()
        r.raw(4 * r.u64())
    table = payload[start:r.pos]
    code = r.bytes_()
    if r.pos != len(payload):
        raise DeviceError(f"unknown CUDA module layout ({len(payload) - r.pos} bytes after the code)")
    return fmt, table, code


def cubin_payload(payload: bytes, arch: str, workdir: str) -> tuple[bytes, dict]:
    """The payload with its CUDA source replaced by a cubin for ``arch``; (payload, compile info)."""
    fmt, table, code = split_cuda_payload(payload)
    if fmt != SOURCE_FORMAT:
        return payload, {"format": fmt.decode(errors="replace"), "compiled": False}
    path = os.path.join(workdir, f"kernels-{len(os.listdir(workdir))}.cubin")
    meta = compile_source(code.decode(), path, arch)
    with open(path, "rb") as f:
        cubin = f.read()
    return _string(BINARY_FORMAT) + table + _string(cubin), meta | {"format": "cubin", "compiled": True}


def rewrite_library_bin(blob: bytes, arch: str, workdir: str) -> tuple[bytes, list[dict]]:
    """``__tvm_ffi__library_bin`` (its u64 size prefix included) with every CUDA module compiled."""
    (n,) = struct.unpack_from("<Q", blob, 0)
    body = blob[8:8 + n]
    r = _Reader(body)
    indptr = [r.u64() for _ in range(r.u64())]
    children = [r.u64() for _ in range(r.u64())]
    out = [struct.pack("<Q", len(indptr)), *(struct.pack("<Q", v) for v in indptr),
           struct.pack("<Q", len(children)), *(struct.pack("<Q", v) for v in children)]
    infos = []
    for _ in range(len(indptr) - 1):
        kind = r.bytes_()
        out.append(_string(kind))
        if kind == b"_lib":
            continue
        payload = r.bytes_()
        if kind == CUDA_KIND:
            payload, info = cubin_payload(payload, arch, workdir)
            infos.append(info)
        out.append(_string(payload))
    if r.pos != len(body):
        raise DeviceError("unknown library layout (bytes after the last module)")
    new = b"".join(out)
    return struct.pack("<Q", len(new)) + new, infos


def _c_array(blob: bytes, symbol: str) -> str:
    rows = [",".join(f"0x{b:02x}" for b in blob[i:i + 32]) for i in range(0, len(blob), 32)]
    return ("#ifdef __cplusplus\nextern \"C\" {\n#endif\n"
            f"__attribute__((visibility(\"default\"))) extern const unsigned char {symbol}[];\n"
            f"const unsigned char {symbol}[{len(blob)}] = {{\n" + ",\n".join(rows) + "\n};\n"
            "#ifdef __cplusplus\n}\n#endif\n")


_BIN_SYMBOL = "__tvm_ffi__library_bin"


def export_with_cubins(lib, path: str, arch: str) -> list[dict]:
    """``lib.export_library(path)`` with its CUDA modules as cubins for ``arch`` (see the module
    doc); returns what each CUDA module was compiled with. A library without CUDA code is
    exported as it is."""
    from tvm.runtime import _ffi_api

    infos: list[dict] = []

    def pack(mod, is_system_lib: bool, prefix: str, workspace: str) -> str:
        c = _ffi_api.ModulePackImportsToC(mod, is_system_lib, prefix)
        symbol = prefix + _BIN_SYMBOL
        start = c.index("= {", c.index(symbol + "[")) + 3
        blob = bytes.fromhex(c[start:c.index("};", start)].replace("0x", "").replace(",", "")
                             .replace("\n", "").replace(" ", ""))
        new, found = rewrite_library_bin(blob, arch, workspace)
        infos.extend(found)
        out = os.path.join(workspace, f"{prefix}devc_cubin.c")
        with open(out, "w") as f:
            f.write(_c_array(new, symbol))
        return out

    with tempfile.TemporaryDirectory(prefix="spatialtune-embed-") as ws:
        lib.export_library(path, fpack_imports=pack, workspace_dir=ws)
    return infos


def library_formats(path: str) -> list[str]:
    """The formats of the CUDA modules packed in the exported library at ``path`` (``cubin``,
    ``cuda`` for source, ...): what a check reads to know nothing is compiled at load."""
    data = open(path, "rb").read()
    out = []
    needle = _string(CUDA_KIND)
    i = data.find(needle)
    while i >= 0:
        try:
            r = _Reader(data, i + len(needle))
            payload = r.bytes_()
            fmt, _, code = split_cuda_payload(payload)
            out.append(fmt.decode())
            i = data.find(needle, r.pos)
        except DeviceError:
            i = data.find(needle, i + 1)
    return out
