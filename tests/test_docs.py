"""Every code block of README.md and docs/*.md runs, so the documentation cannot drift from the
code (as sqlite-utils tests its docs).

A block runs in a sandbox: a temporary directory that looks like a checkout (search_spaces,
scripts, the project's .venv, a copy of the embedded database) with ``SPATIALTUNE_DB`` pointing
into it and ``SPATIALTUNE_QUICK=1``, so scripts run their quick mode and nothing touches the
repository's own database. ``python`` blocks are executed; ``bash`` blocks line by line (``\\``
continues a line); ``console`` blocks run their ``$`` lines. An HTML comment right before a block
says how to judge it:

- ``<!-- doctest: gpu -->``: on a machine without a GPU each command must fail with exit code 2
  and a one-line error (on one with a GPU it must succeed);
- ``<!-- doctest: fails 2 -->``: each command must exit with code 2 (a documented bad input);
- ``<!-- doctest: after NAME -->`` / ``<!-- doctest: name NAME -->``: run after the block named
  NAME, in the same sandbox (blocks of one file share a sandbox, in order, anyway);
- ``text`` blocks are pictures, not code: the architecture picture must name every package.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HAS_GPU, ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!--\s*doctest:\s*(?P<directive>[^>]*?)\s*-->\s*\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)\n```",
                   re.S)


def blocks(path: Path) -> list[tuple[int, str, str, str]]:
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out.append((line, m.group("lang"), m.group("body"), (m.group("directive") or "").strip()))
    return out


def commands(lang: str, body: str) -> list[str]:
    if lang == "console":
        lines = [ln[2:] for ln in body.splitlines() if ln.startswith("$ ")]
    else:
        lines = [ln for ln in body.splitlines()]
    out, cur = [], ""
    for ln in lines:
        s = ln.split(" # ")[0].rstrip() if not ln.lstrip().startswith("#") else ""
        if not s.strip() and not cur:
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        out.append((cur + s).strip())
        cur = ""
    return [c for c in out if c]


@pytest.fixture(scope="module")
def sandboxes(tmp_path_factory):
    made = {}

    def get(doc: Path) -> Path:
        if doc not in made:
            d = tmp_path_factory.mktemp(doc.stem.replace(".", "_"))
            for name in ("search_spaces", "scripts", ".venv", "spatialtune", "tests", "docs"):
                (d / name).symlink_to(ROOT / name)
            # a copy dated in the past: scripts/_env.sh reinstalls when pyproject.toml is newer than
            # the venv's stamp, and an editable install from here would point the venv at the sandbox
            shutil.copy(ROOT / "pyproject.toml", d / "pyproject.toml")
            os.utime(d / "pyproject.toml", (0, 0))
            (d / "tuning_db").mkdir()
            shutil.copy(ROOT / "tuning_db" / "spatialtune.sqlite", d / "tuning_db" / "spatialtune.sqlite")
            made[doc] = d
        return made[doc]

    yield get
    # A block that failed half-way never reached its own `kill` lines: stop what it started in
    # the background (a tracker left on its fixed port would answer the next run's job).
    for d in made.values():
        for pidfile in d.glob("*.pid"):
            try:
                pid = int(pidfile.read_text().split()[0])
            except (ValueError, IndexError):
                continue
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass


def _env(box: Path) -> dict[str, str]:
    return dict(os.environ, SPATIALTUNE_DB=str(box / "tuning_db" / "spatialtune.sqlite"), SPATIALTUNE_QUICK="1",
                PATH=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT),
                REPORT=str(box / "report"))


CASES = [(doc, line, lang, body, directive) for doc in DOCS for line, lang, body, directive in blocks(doc)]


def test_the_docs_have_code_to_run():
    """The collector sees the blocks: each document with a fence yields cases."""
    with_fences = {doc.name for doc in DOCS if "```" in doc.read_text()}
    assert with_fences >= {"README.md", "lookup.md", "architecture.md"}
    assert {doc.name for doc, *_ in CASES} == with_fences


@pytest.mark.parametrize("doc, line, lang, body, directive", CASES,
                         ids=[f"{d.name}:{ln}" for d, ln, *_ in CASES])
def test_code_block(doc, line, lang, body, directive, sandboxes):
    box = sandboxes(doc)
    env = _env(box)
    if lang == "text":
        if "cli" in body and "workloads" in body:  # the architecture picture
            packages = sorted(p.name for p in (ROOT / "spatialtune").iterdir() if (p / "__init__.py").exists())
            missing = [p for p in packages if not re.search(rf"\b{p}\b", body)]
            assert not missing, f"{doc.name}:{line}: the picture leaves out {missing}"
        return
    if lang == "python":
        p = subprocess.run([sys.executable, "-c", body], cwd=box, env=env, capture_output=True, text=True,
                           timeout=900)
        assert p.returncode == 0, f"{doc.name}:{line}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        return
    if lang not in ("bash", "console", "sh"):
        pytest.fail(f"{doc.name}:{line}: a ```{lang} block: say what it is (bash, console, python, text)")
    for cmd in commands(lang, body):
        script = cmd.split()[0]
        if script.startswith("scripts/"):  # run in its quick mode by tests/test_scripts.py already
            from test_scripts import EXPECT

            assert (ROOT / script).is_file() and Path(script).name in EXPECT, f"{doc.name}:{line}: {cmd}"
            continue
        p = subprocess.run(["bash", "-c", cmd], cwd=box, env=env, capture_output=True, text=True, timeout=1200)
        where = f"{doc.name}:{line}: {cmd}\n{p.stdout[-1500:]}\n{p.stderr[-2500:]}"
        if directive == "gpu" and not HAS_GPU or directive == "fails 2":
            assert p.returncode == 2, where
            assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr, where
        else:
            assert p.returncode == 0, where
