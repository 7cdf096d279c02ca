"""Every script in scripts/ runs, in its quick mode (SPATIALTUNE_QUICK=1), so none can break
unnoticed. The scripts write into a temporary database and directory, never the repository's."""
import os
import subprocess

import pytest

from conftest import ROOT

SCRIPTS = sorted(p.name for p in (ROOT / "scripts").iterdir()
                 if p.is_file() and os.access(p, os.X_OK) and not p.name.startswith("_") and p.suffix != ".py")
# what each quick run must print, so a script that "succeeds" without doing its job fails here
EXPECT = {
    "demo": "report of this database",
    "test": "tests collected",
    "bench": "time per trial",
    "bench-lookup": "spatialtune Lookup, warm",
    "bench-search": "best@",
    "bench-distributed": "scaling efficiency with 2 servers",

    "bench-model": "end-to-end latency vs ONNX Runtime",
    "gpu-bundle": "candidates sm_90",
    "gpu-check": "cpu:50%",
    "figures": "figures checked",
}


def test_every_script_has_an_expectation():
    assert set(SCRIPTS) <= set(EXPECT), f"scripts without a quick-mode check: {set(SCRIPTS) - set(EXPECT)}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_quick_mode(name, tmp_path):
    if name == "gpu-bundle":
        from spatialtune.cuda.cubin import find_nvcc

        if not find_nvcc():
            pytest.skip("no nvcc here to compile the bundle's cubins")
    env = dict(os.environ, SPATIALTUNE_QUICK="1", SPATIALTUNE_DB=str(tmp_path / "db.sqlite"),
               REPORT=str(tmp_path / "report"), OUT=str(tmp_path / "out"))
    p = subprocess.run([str(ROOT / "scripts" / name)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=1200)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{name} exited {p.returncode}:\n{out[-4000:]}"
    assert EXPECT[name] in out, f"{name} did not print {EXPECT[name]!r}:\n{out[-4000:]}"
    if name == "demo":  # it wrote where it was told, not into the repository's database
        assert (tmp_path / "db.sqlite").exists() and (tmp_path / "report" / "report.html").exists()
