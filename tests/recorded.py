"""A runner that answers from a table of real measurements and measures what the table lacks.

With the search's threads at 1 a search is a function of its seed and of the times it is told, so
replaying recorded times replays the whole search: a comparison of search methods becomes the same
on every machine and under any load (the issue's "replayed times"). Kernels the table lacks (after a
change to the search, or another TVM) are measured live and added to the table in memory; a test
says how many, and ``SPATIALTUNE_RECORD=1`` writes them back to the file.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from spatialtune.measure.builder import Builder, BuildResult, LocalBuilder
from spatialtune.measure.runner import LocalRunner, MeasureResult, Runner

FIELDS = ("status", "error", "times", "median_s", "rel_err")
MCPU = "x86-64-v3"  # AVX2 and FMA: any x86-64 CI machine compiles the same kernels, with the same hashes
# What a replayed tune needs: one search thread, the fixed CPU, and no build deadline (it depends on timing)
TUNE_OPTIONS = dict(search_threads=1, mcpu=MCPU, build_deadline=None)


@contextlib.contextmanager
def replaying(path: Path, partition, settings, art: Path):
    """(runner, builder) answering from ``path``'s table; what it lacks is built in ``art`` and
    measured live with ``settings``. Skips the test off x86-64 (the recorded kernels are x86 code)."""
    if platform.machine() != "x86_64":
        pytest.skip("the recorded kernels are x86-64 code")
    with LocalRunner(partition, settings=settings) as live, LocalBuilder(art, relative_timeout=None) as b:
        runner = RecordedRunner(path, live)
        yield runner, RecordedBuilder(runner, b)


class RecordedRunner(Runner):
    real = False  # its answers are not measurements made now: the job adds no baselines or confirmations

    def __init__(self, path: Path, live: Runner):
        self.path, self.live = Path(path), live
        raw = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.meta = raw.get("meta", {})
        self.table: dict[str, dict] = raw.get("results", {})
        self.replayed = self.measured = 0

    def run(self, share, interference, inputs, on_result=None):
        missing = [i for i, x in enumerate(inputs) if x.mod_hash not in self.table]
        if missing:
            for i, r in zip(missing, self.live.run(share, interference, [inputs[i] for i in missing])):
                self.table[inputs[i].mod_hash] = {k: v for k, v in asdict(r).items() if k in FIELDS}
        self.measured += len(missing)
        self.replayed += len(inputs) - len(missing)
        out = []
        for i, x in enumerate(inputs):
            out.append(MeasureResult(**self.table[x.mod_hash], granted_units=share.units))
            if on_result is not None:
                on_result(i, out[-1])
        return out

    def save_if_asked(self, **meta) -> None:
        if os.environ.get("SPATIALTUNE_RECORD") == "1":
            meta = self.meta | meta | {"recorded": time.strftime("%Y-%m-%d")}
            self.path.write_text(json.dumps({"meta": meta, "results": self.table}, indent=0,
                                            sort_keys=True) + "\n")


class RecordedBuilder(Builder):
    """Builds only what ``runner``'s table lacks: a recorded kernel needs no artifact to be replayed."""

    def __init__(self, runner: RecordedRunner, live: Builder):
        self.runner, self.live = runner, live

    def build(self, inputs, target):
        out = [BuildResult(artifact="(recorded)") if x.name in self.runner.table else None for x in inputs]
        todo = [i for i, r in enumerate(out) if r is None]
        for i, r in zip(todo, self.live.build([inputs[i] for i in todo], target)):
            out[i] = r
        return out
