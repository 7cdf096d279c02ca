"""Measuring throughput over TVM's RPC tracker: trials per minute with 1, 2 and (where the machine
has the cores) 4 loopback `spatialtune serve` servers, each confined to its own core.

The candidates are built beforehand (uniform samples of one workload's design space), so what is
timed is what the servers add: the driver sending artifacts and requests to free servers, the
servers checking and timing the kernels, the results coming back. Each server count first
measures one candidate per server untimed (each server starts its measuring worker once), then
the whole pool of candidates. Printed: the machine, trials per minute per server count, the
speedup and scaling efficiency over one server, how busy the servers were (their own time
measuring over the wall time), and what limits the scaling (the servers, the driver, or, in a
tuning job on this machine, the building).

SPATIALTUNE_QUICK=1 (or --quick): 1 and 2 servers, 6 candidates, short timings; a smoke test.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from spatialtune.device import describe_machine, target_for  # noqa: E402
from spatialtune.distributed.runner import RpcRunner  # noqa: E402
from spatialtune.distributed.tracker import servers_under, tracker_summary  # noqa: E402
from spatialtune.measure.builder import BuildInput, LocalBuilder  # noqa: E402
from spatialtune.measure.runner import RunInput, RunSettings  # noqa: E402
from spatialtune.workloads.spec import load_space  # noqa: E402

log = logging.getLogger("bench-distributed")
KEY = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """The tracker and servers this run started; all of them are killed at the end."""

    def __init__(self, logs: Path):
        self.logs, self.procs = logs, []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdout=open(self.logs / f"{name}.log", "ab"), stderr=subprocess.STDOUT,
                             start_new_session=True, cwd=ROOT)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        import psutil

        try:
            family = [p, *psutil.Process(p.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = [p]
        for q in family:  # measuring workers run in their own process groups
            try:
                os.killpg(q.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        p.wait()

    def close(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)


def wait_for(tracker: tuple[str, int], n: int, procs: list[subprocess.Popen], logs: Path,
             timeout: float = 90) -> None:
    """Until the tracker answers and ``n`` servers are registered under KEY."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if len(servers_under(tracker_summary(*tracker, timeout=2), KEY)) >= n:
                return
        except Exception:
            pass
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"a process exited (code {p.returncode}); its log is in {logs}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{n} servers did not register within {timeout:.0f} s (logs in {logs})")
        time.sleep(0.3)


def prebuild(device, workload, n: int, out: Path, workers: int) -> tuple[list[RunInput], float]:
    from spatialtune.search.uniform import UniformSampler

    target = target_for(device, 1)
    cands = UniformSampler(workload, target, seed=1).sample(n)
    t0 = time.perf_counter()
    with LocalBuilder(out, workers=workers, timeout=30) as b:  # a pathological compile is left out, not waited for
        built = b.build([BuildInput.of(c, workload.key) for c in cands], target)
    build_s = time.perf_counter() - t0
    inputs = [RunInput(workload.to_dict(), r.artifact, r.cubin, c.mod_hash) for c, r in zip(cands, built) if r.ok]
    return inputs, len(cands) / build_s * 60


def measure(tracker: str, inputs: list[RunInput], n: int, settings: RunSettings) -> dict:
    with RpcRunner(tracker, KEY, settings=settings) as runner:
        _, partition = runner.measures_on()
        share = partition.grant(100)
        runner.run(share, "none", inputs[:n])  # each server starts its measuring worker, untimed
        before = runner.stats()
        t0 = time.perf_counter()
        results = runner.run(share, "none", inputs)
        wall = time.perf_counter() - t0
        after = runner.stats()
    busy = sum(after[a]["busy_s"] - before.get(a, {}).get("busy_s", 0.0) for a in after)
    used = sum(1 for a in after if after[a]["measured"] > before.get(a, {}).get("measured", 0))
    return {"n": n, "trials": len(results), "ok": sum(r.status == "ok" for r in results), "wall_s": wall,
            "per_min": len(results) / wall * 60, "busy": busy / (n * wall), "used": used,
            "failures": sum(s["failures"] for s in after.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", default=bool(os.environ.get("SPATIALTUNE_QUICK")))
    ap.add_argument("--candidates", type=int, default=None, help="candidates measured per server count")
    ap.add_argument("--workload", default="dense_small")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cores = sorted(os.sched_getaffinity(0))
    counts = [1, 2] if args.quick else [n for n in (1, 2, 4) if n <= len(cores)]
    n_cands = args.candidates or (6 if args.quick else 48)
    settings = RunSettings(repeat=3, min_repeat_ms=5, warmup_ms=10) if args.quick else RunSettings()
    workload = load_space(ROOT / "search_spaces" / "demo.toml").select([args.workload])[0]
    print(f"machine: {describe_machine()}")
    print(f"workload: {workload.name} ({workload.key}); measurements: repeat {settings.repeat}, "
          f"min_repeat_ms {settings.min_repeat_ms}, warmup_ms {settings.warmup_ms}")
    tmp = Path(tempfile.mkdtemp(prefix="spatialtune-bench-distributed-"))
    procs = Procs(tmp)
    try:
        port = free_port()
        tracker = ("127.0.0.1", port)
        t = procs.start("tracker", [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                                    str(port), "--port-end", str(port + 1)])
        wait_for(tracker, 0, [t], tmp)
        rows, inputs, build_rate = [], None, None
        for n in counts:
            servers = [procs.start(f"serve{c}", [sys.executable, "-m", "spatialtune.cli", "serve", "--tracker",
                                                 f"127.0.0.1:{port}", "--key", KEY, "--cores", str(cores[c]),
                                                 "--host", "127.0.0.1", "--port", str(free_port()), "--port-end", "65536"])
                       for c in range(n)]
            wait_for(tracker, n, [t, *servers], tmp)
            if inputs is None:
                with RpcRunner(f"127.0.0.1:{port}", KEY) as probe:
                    device, _ = probe.measures_on()
                inputs, build_rate = prebuild(device, workload, n_cands, tmp / "art", workers=len(cores))
                print(f"built {len(inputs)} candidates beforehand for {device.name} [{device.id}], 1 core: "
                      f"{build_rate:.0f} builds/min on this machine with {len(cores)} build workers")
            rows.append(measure(f"127.0.0.1:{port}", inputs, n, settings))
            for s in servers:
                procs.stop(s)
            time.sleep(1.0)  # the tracker drops the stopped servers
    finally:
        procs.close()
    report(rows, counts, cores, build_rate)
    return 0


def report(rows: list[dict], counts: list[int], cores: list[int], build_rate: float) -> None:
    base = rows[0]["per_min"]
    print(f"{'servers':>7}  {'trials':>6}  {'ok':>4}  {'wall s':>7}  {'trials/min':>10}  {'speedup':>7}  "
          f"{'efficiency':>10}  {'servers busy':>12}")
    for r in rows:
        speed = r["per_min"] / base
        print(f"{r['n']:>7}  {r['trials']:>6}  {r['ok']:>4}  {r['wall_s']:>7.1f}  {r['per_min']:>10.1f}  "
              f"{speed:>6.2f}x  {speed / r['n']:>10.2f}  {r['busy']:>11.0%}")
    for n in (1, 2, 4):
        if n not in counts:
            print(f"{n:>7}  (needs {n} cores for {n} one-core servers; this machine has {len(cores)})")
    last = rows[-1]
    speed = last["per_min"] / base
    print(f"scaling efficiency with {last['n']} servers: {speed / last['n']:.2f} ({speed:.2f}x; target "
          f"{ {2: 1.8, 4: 3.4}.get(last['n'], last['n'] * 0.85):.1f}x)")
    if last["failures"]:
        print(f"note: {last['failures']} failed RPC attempts during the runs (see the warnings above)")
    drivers_share = 1 - last["busy"]
    if last["busy"] >= 0.85:
        limit = (f"the servers: they measured {last['busy']:.0%} of the wall time, so more servers add "
                 "throughput until the driver's share of the work catches up")
    else:
        limit = (f"the driver and the RPC round trips: the servers waited {drivers_share:.0%} of the time for the "
                 "next request")
    if len(cores) <= last["n"]:
        limit += (f"; on this machine the driver (its lanes and client processes) runs on the same {len(cores)} "
                  "cores as the servers, so it takes time from them")
    print(f"bottleneck: {limit}")
    print(f"in a tuning job on this machine the builds would cap measuring at about {build_rate:.0f} trials/min "
          f"(built here with {len(cores)} workers, while the servers use the same cores), against "
          f"{last['per_min']:.0f} trials/min measured with {last['n']} servers")


if __name__ == "__main__":
    sys.exit(main())
