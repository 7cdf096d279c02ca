"""The driver's side of one RPC session, run inside a client worker process.

TVM's RPC calls block in C++ with no time limit, so the driver makes them in a
:class:`~spatialtune.measure.worker.Worker` (one per server it drives at a time), which it kills
when a call outlives its limit: a hung server costs that call, never the job. Failures come back
as ``{"rpc_error": one line}`` saying what happened.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .protocol import INFO_FN, MEASURE_FN, dumps, loads

_state: dict[str, Any] = {}


def init_client() -> int:
    import tvm.rpc  # noqa: F401  (paid once per client worker)

    return os.getpid()


def open_session(host: str, port: int, matchkey: str, session_timeout: float) -> dict[str, Any]:
    """Connect to the server the tracker handed us; returns its info or ``{"rpc_error"}``."""
    from tvm import rpc

    close_session()
    _state.update(opened=time.monotonic(), limit=session_timeout)
    try:
        sess = rpc.connect(host, port, matchkey, session_timeout=session_timeout)
    except Exception as e:
        return {"rpc_error": describe(e, "connecting")}
    try:
        info = loads(sess.get_function(INFO_FN)())
    except Exception as e:
        msg = describe(e, "asking who it is")
        if "not found" in msg.lower() or "cannot find" in msg.lower():
            msg = f"is not a spatialtune server (no {INFO_FN}; started with `python -m tvm.exec.rpc_server`?)"
        return {"rpc_error": msg}
    _state["sess"] = sess
    return info


def measure(request: dict[str, Any], artifact: str | None, cubin: str | None) -> dict[str, Any]:
    """Upload the kernel's files and have the server measure it: ``{"result"}``, ``{"error"}`` (the
    server could not measure) or ``{"rpc_error"}`` (the session failed)."""
    sess = _state.get("sess")
    if sess is None:
        return {"rpc_error": "has no session open with this driver"}
    uploaded = []
    try:
        for field, path in (("artifact", artifact), ("cubin", cubin)):
            if path:
                # One directory per session on the server; the kernel's file name (its hash) is
                # unique within a job, and removed once measured.
                name = os.path.basename(path)
                sess.upload(path, target=name)
                uploaded.append(name)
                request[field] = name
        reply = loads(sess.get_function(MEASURE_FN)(dumps(request)))
        remove = sess.get_function("tvm.rpc.server.remove")
        for name in uploaded:
            remove(name)
        return reply
    except Exception as e:
        return {"rpc_error": describe(e, "measuring")}


def close_session() -> None:
    sess = _state.pop("sess", None)
    del sess  # the last reference: TVM closes the connection and the server's session ends


def describe(e: BaseException, doing: str) -> str:
    """What the server did, as the end of a sentence that starts with its address (one line). A session the server ended at its time limit is said as such:
    TVM reports it as a timeout when the client was waiting, and as a plain shutdown of the
    connection otherwise, so a shutdown near the limit counts as the limit."""
    text = str(e)
    low = text.lower()
    limit, age = _state.get("limit") or 0, time.monotonic() - _state.get("opened", time.monotonic())
    if "rpcsessiontimeouterror" in low or "session has expired" in low or (limit and age >= 0.95 * limit):
        return f"ended the session while {doing}: its {limit:g} s session time limit expired"
    if "connect to" in low and "failed" in low or "connection refused" in low:
        return f"could not be reached while {doing} (it stopped?)"
    if any(s in low for s in ("kshutdown", "connection reset", "broken pipe", "socket closed", "connection closed")):
        return f"closed the connection while {doing} (killed or crashed?)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else type(e).__name__
    return f"failed while {doing}: {type(e).__name__}: {last[:300]}"
