"""``spatialtune serve``: measure for tuning jobs elsewhere, through a TVM RPC tracker."""

from __future__ import annotations

from ..distributed.tracker import START_WAIT_S


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="measure for tuning jobs elsewhere: register with a TVM RPC tracker")
    p.add_argument("--tracker", required=True, metavar="HOST:PORT", help="the tracker (python -m tvm.exec.rpc_tracker)")
    p.add_argument("--key", required=True, help="the kind of device this server offers; one key per device model")
    p.add_argument("--partition", default="cpu", choices=("cpu", "mps", "green"),
                   help="how shares are held: cpu core sets (default), MPS or green contexts")
    p.add_argument("--cores", default=None, metavar="LIST",
                   help="run on these cores only, e.g. 0 or 2-3 (with --partition cpu: the device is these cores)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all; use a private one)")
    p.add_argument("--port", type=int, default=9091, help="first port to try (default 9091)")
    p.add_argument("--port-end", type=int, default=None,
                   help="ports are tried up to this one, exclusive (default 9199, or --port + 100 above it)")
    p.add_argument("--custom-addr", default=None, metavar="HOST",
                   help="address to give the tracker for this server, when drivers reach it under another name")
    p.add_argument("--tracker-wait", type=float, default=START_WAIT_S, metavar="SECONDS",
                   help=f"at start, how long to wait for the tracker to answer (default {START_WAIT_S:g})")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(a) -> int:
    import logging

    from ..distributed.server import ListenAt, parse_cores, serve

    serve(a.tracker, a.key, partition=a.partition, cores=parse_cores(a.cores),
          listen=ListenAt(a.host, a.port, a.port_end, a.custom_addr), tracker_wait=a.tracker_wait,
          verbose=logging.getLogger().isEnabledFor(logging.INFO))
    return 0
