"""What a driver and a measuring server say to each other, besides TVM's own RPC traffic.

Over a session the driver uploads the built kernel (the ``.so``, and the ``.cubin`` on CUDA) into
the session's work directory with TVM's ``upload``, then calls one of two functions the server
registered as TVM global functions, each taking and returning one JSON string:

- ``spatialtune.serve.info``: the server's device (``DeviceInfo.to_dict()``), partition kind,
  cores, host and protocol version;
- ``spatialtune.serve.measure``: one request (:func:`measure_request`) in, ``{"result": ...}``
  (the ``MeasureResult`` fields) or ``{"error": "one line"}`` out. An error means the server could
  not measure at all (its measuring worker did not start, the share is not what the driver
  expected): the driver counts it against the server and measures the candidate elsewhere. A
  kernel that crashes, hangs or computes a wrong answer is a *result*, as in a local run.

This module imports nothing heavy: the CLI parses addresses with it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from ..errors import ConfigError

PROTOCOL = 1
INFO_FN = "spatialtune.serve.info"
MEASURE_FN = "spatialtune.serve.measure"


def parse_address(text: str, what: str = "--tracker") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9190`` for IPv6) -> (host, port); ConfigError in one line."""
    host, sep, port = str(text).strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


def measure_request(*, device_id: str, kind: str, workload: dict, share, interference: str, settings,
                    artifact: str | None = None, cubin: str | None = None) -> dict[str, Any]:
    """A request to measure one kernel (``kind`` "kernel", artifact and cubin named as uploaded
    into the session) or numpy's baseline (``kind`` "numpy"), under ``share`` (a
    :class:`~spatialtune.terms.Share` as the driver granted it) next to ``interference``."""
    return {"protocol": PROTOCOL, "device_id": device_id, "kind": kind, "workload": workload,
            "share": {"partition": share.partition_kind, "ratio": share.ratio, "units": share.units,
                      "total": share.total},
            "interference": interference, "settings": asdict(settings), "artifact": artifact, "cubin": cubin}


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def loads(text: str) -> Any:
    return json.loads(str(text))
