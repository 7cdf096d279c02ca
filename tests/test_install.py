"""`pip install .` from a checkout gives a spatialtune that works from any directory: the shipped
search spaces by name, the per-user default database, `db vacuum`."""
import os
import subprocess
import sys
import sysconfig

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv holding a wheel of this checkout (no editable link back to it), whose other
    packages come from the project's own venv, so nothing is downloaded."""
    d = tmp_path_factory.mktemp("install")
    wheel_dir = d / "wheels"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    (wheel,) = wheel_dir.glob("spatialtune-*.whl")
    venv = d / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python*/site-packages"))
    # the project's venv for TVM and the rest; its .pth files (the editable link) are not read from here
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: without it pip would uninstall the running environment's own spatialtune
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", "--prefix",
                        str(venv), str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return venv


def _run(venv, *args, cwd, home):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPATIALTUNE_DB", "VIRTUAL_ENV")}
    env |= {"HOME": str(home), "XDG_DATA_HOME": str(home / "data")}
    return subprocess.run([str(venv / "bin" / "python"), "-m", "spatialtune.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_installed_spatialtune_works_from_any_directory(installed, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    where = _run(installed, "workloads", "--space", "bert-base", cwd=tmp_path, home=home)
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith("dense_fp32_M128_N2304_K768\tbert_qkv_fp32")
    p = subprocess.run([str(installed / "bin" / "python"), "-c", "import spatialtune; print(spatialtune.__file__)"],
                       cwd=tmp_path, capture_output=True, text=True, env={"HOME": str(home), "PATH": os.environ["PATH"]})
    assert str(installed) in p.stdout and str(ROOT) not in p.stdout  # the installed copy, not the checkout
    bad = _run(installed, "workloads", "--space", "no-such-space", cwd=tmp_path, home=home)
    assert bad.returncode == 2 and "shipped: bert-base, demo" in bad.stderr
    # the default database of an installed spatialtune is the user's, not a checkout's
    empty = _run(installed, "show", cwd=tmp_path, home=home)
    assert empty.returncode == 2 and str(home / "data" / "spatialtune" / "spatialtune.sqlite") in empty.stderr
    copy = tmp_path / "v2.sqlite"
    copy.write_bytes((ROOT / "tests" / "data" / "db_v2.sqlite").read_bytes())
    vac = _run(installed, "db", "vacuum", "--db", str(copy), cwd=tmp_path, home=home)
    assert vac.returncode == 0 and "MB ->" in vac.stdout, vac.stderr
