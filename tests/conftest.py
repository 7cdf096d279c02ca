import fcntl
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPACES = ROOT / "search_spaces"
DEMO = SPACES / "demo.toml"


def _has_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        return n > 0
    except Exception:
        return False


HAS_GPU = _has_gpu()


# Files whose tests run independently of each other, so two processes may split them; every other
# file keeps its tests in one process, in order (module fixtures, docs blocks that build on the
# block before them).
_SPLIT = {"test_scripts.py"}
# Long tests that use no fixture of their file's other tests, each its own unit.
_ALONE = {"test_tune.py::test_kill_9_then_rerun_resumes_without_repeating",
          "test_tune.py::test_cost_model_ranks_held_out_candidates_better_than_random"}
# The costliest groups start first, so neither process is left with a long one at the end; the
# tuned database is made by the first of them while the other process runs the search test.
_FIRST = ["test_tune.py", "test_search.py", "test_tune.py::test_cost_model_ranks_held_out_candidates_better_than_random",
          "test_tune.py::test_kill_9_then_rerun_resumes_without_repeating", "test_scripts.py::test_script_quick_mode[demo]",
          "test_scripts.py::test_script_quick_mode[bench-search]", "docs:models.md", "docs:README.md",
          "test_scripts.py::test_script_quick_mode[bench-model]", "docs:distributed.md", "test_records.py",
          "test_distributed.py", "test_models.py", "test_report.py"]


def _group(nodeid: str) -> str:
    """The tests that must run in one process, in order, as one unit of work."""
    path, _, rest = nodeid.partition("::")
    f = path.rsplit("/", 1)[-1]
    if f in _SPLIT or f"{f}::{rest}" in _ALONE:
        return f"{f}::{rest}"
    doc = re.match(r"test_code_block\[(.+?):\d+\]", rest)
    if f == "test_docs.py" and doc:
        return "docs:" + doc.group(1)  # one sandbox per document, its blocks in order
    return f


@pytest.hookimpl(optionalhook=True)  # a run without pytest-xdist (-p no:xdist) has no such hook
def pytest_xdist_make_scheduler(config, log):
    """xdist's loadscope scheduling with our units of work (its loadgroup marks are lost on
    pytest 9: the group never reaches the node id), handed out in collection order."""
    from xdist.scheduler import LoadScopeScheduling

    class Groups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    config.option.loadscopereorder = False
    return Groups(config, log)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        g = _group(item.nodeid)
        return _FIRST.index(g) if g in _FIRST else len(_FIRST)

    items.sort(key=rank)  # stable: the tests of a group keep their order
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="no NVIDIA GPU probed on this machine (NVML found none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run_cli(*args, timeout=600, env=None, check=False):
    """Run the installed CLI as a user would; returns CompletedProcess."""
    cmd = [sys.executable, "-m", "spatialtune.cli", *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or os.environ.copy(), cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="session")
def demo_space():
    from spatialtune.workloads.spec import load_space

    return load_space(DEMO)


def _once(tmp_path_factory, name, make):
    """A session fixture's result made once per test run, also when pytest-xdist spreads the
    tests over several processes (each would otherwise repeat a minutes-long tuning run): the
    first process to take the lock makes it in the run's shared directory, the others read it.
    ``make(dir)`` returns a picklable value."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this run (and only this run)
    d = root / f"once-{name}"
    with open(root / f"once-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = d / "value.pickle"
        if not done.exists():
            d.mkdir(exist_ok=True)
            value = make(d)
            done.write_bytes(pickle.dumps(value))
        return pickle.loads(done.read_bytes())


@pytest.fixture(scope="session")
def tuned_db(tmp_path_factory, demo_space):
    """A real small tuning run shared by tests that only read results: dense_small and conv_small
    at 100% and 50% of the cores, 12 trials each."""
    from spatialtune.store.database import TuningDatabase
    from spatialtune.measure.runner import RunSettings
    from spatialtune.tuning import TuneOptions, tune

    def make(d):
        path = d / "tuned.sqlite"
        with TuningDatabase(path) as db:
            summary = tune(demo_space.select(["dense_small", "conv_small"]), [50, 100], db,
                           # a quarter of the default population: these tests read what a search
                           # found, not how well it searches (tests/test_search.py does that)
                           TuneOptions(trials=12, batch=6, population=64,
                                       run=RunSettings(repeat=3, min_repeat_ms=10)))
        return path, summary

    return _once(tmp_path_factory, "tuned", make)


@pytest.fixture(scope="session")
def tenancy_db(tuned_db, tmp_path_factory, demo_space):
    """tuned_db plus dense_small tuned next to the CPU memory neighbour at 100 % and 50 %: every
    cell of the single- vs multi-tenant comparison of one workload, measured for real."""
    import sqlite3

    from spatialtune.measure.runner import RunSettings
    from spatialtune.store.database import TuningDatabase
    from spatialtune.tuning import TuneOptions, tune

    def make(d):
        path = d / "tenancy.sqlite"
        src, dst = sqlite3.connect(tuned_db[0]), sqlite3.connect(path)
        src.backup(dst)
        src.close()
        dst.close()
        with TuningDatabase(path) as db:
            summary = tune(demo_space.select(["dense_small"]), [50, 100], db,
                           TuneOptions(trials=8, batch=4, interference="memory", population=64,
                                       run=RunSettings(repeat=3, min_repeat_ms=10)))
        return path, summary

    return _once(tmp_path_factory, "tenancy", make)
