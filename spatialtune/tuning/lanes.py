"""How a tune job is laid out: the device and partition it measures on (this machine's, or a
pool of servers'), and workloads tuned in threads when the runner measures several at once."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from ..device import DeviceInfo, check_mcpu, detect_cpu, detect_cuda
from ..errors import ConfigError
from ..measure.runner import Runner
from ..partitions import Partition, create_partition
from ..store.database import TuningDatabase
from .options import TuneOptions
from .results import ShareResult

ProgressFn = Callable[[dict], None]


def device_and_partition(opt: TuneOptions, runner: Runner | None) -> tuple[DeviceInfo, Partition]:
    """This machine's, or those of the runner's servers (with --mcpu/--arch applied)."""
    remote = runner.measures_on() if runner is not None else None
    if remote is None:
        device = detect_cuda(arch=opt.arch) if opt.target == "cuda" else detect_cpu(opt.mcpu)
        partition = create_partition(opt.partition or ("cpu" if opt.target == "cpu" else "mps"))
        if opt.target == "cpu" and partition.kind != "cpu":
            raise ConfigError(f"partition {partition.kind!r} needs --target cuda")
        return device, partition
    device, partition = remote
    if device.kind != opt.target:
        raise ConfigError(f"the measuring servers have a {device.kind} device ({device.name}): pass --target "
                          f"{device.kind}")
    asked = getattr(opt.partition, "kind", opt.partition)
    if asked and asked != partition.kind:
        raise ConfigError(f"the measuring servers hold shares with the {partition.kind!r} partition, not {asked!r}")
    if opt.mcpu and device.kind == "cpu":
        device = dataclasses.replace(device, arch=check_mcpu(opt.mcpu))
    if opt.arch and device.kind == "cuda":
        device = dataclasses.replace(device, arch=opt.arch)
    return device, partition


def serialised(fn: ProgressFn) -> ProgressFn:
    lock = threading.Lock()

    def call(ev: dict) -> None:
        with lock:
            fn(ev)
    return call


def in_threads(fn, n: int, lanes: int, db_path: Path) -> list[tuple[list[ShareResult], bool]]:
    """``fn(i, db)`` for i in range(n), ``lanes`` at a time, each thread with its own database
    connection (a connection is not shared between threads); results in workload order. The first
    error is raised once the threads that were running have stopped (they stop soon: the runner's
    servers are gone or it is being closed)."""
    def run(i: int):
        with TuningDatabase(db_path) as own:
            return fn(i, own)

    pool = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="tune")
    futures = [pool.submit(run, i) for i in range(n)]
    try:
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
