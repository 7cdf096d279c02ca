"""Regenerate (or check) every figure in README.md and docs/*.md from the repository.

A figure is a fenced ``text`` block right after a marker naming the command that produces it::

    <!-- figure: spatialtune compare --db tuning_db/spatialtune.sqlite --workload mm_1024 -->
    ```text
    ...the command's output...
    ```

The commands run from the repository root on what the repository holds (the embedded database,
the committed benchmark results under docs/data/), so every number in the docs can be produced
again by anyone with a checkout. ``--check`` changes nothing and fails listing the figures that
differ from what their commands print now (the test suite runs it).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!--\s*figure:\s*(?P<cmd>.*?)\s*-->\s*$")


def figures(text: str) -> list[tuple[str, int, int]]:
    """(command, start, end) of each figure's body in ``text`` (the lines between ```text and ```)."""
    lines = text.splitlines(keepends=True)
    offsets, pos = [], 0
    for ln in lines:
        offsets.append(pos)
        pos += len(ln)
    offsets.append(pos)
    out = []
    for i, ln in enumerate(lines):
        m = MARKER.match(ln.strip())
        if not m or i + 1 >= len(lines) or lines[i + 1].strip() != "```text":
            continue
        end = next((k for k in range(i + 2, len(lines)) if lines[k].startswith("```")), None)
        if end is None:
            raise SystemExit(f"figure {m.group('cmd')!r}: no closing fence")
        out.append((m.group("cmd"), offsets[i + 2], offsets[end]))
    return out


def run(cmd: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("SPATIALTUNE_DB", "SPATIALTUNE_QUICK")}
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "200"
    p = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"figure command failed ({p.returncode}): {cmd}\n{p.stderr[-2000:]}")
    return "\n".join(line.rstrip() for line in p.stdout.rstrip("\n").splitlines())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; fail when a figure is out of date")
    a = ap.parse_args()
    check = a.check or bool(os.environ.get("SPATIALTUNE_QUICK"))
    stale, n = [], 0
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        out, pos = [], 0
        for cmd, start, end in figures(text):
            n += 1
            fresh = run(cmd) + "\n"
            if fresh != text[start:end]:
                stale.append(f"{doc.relative_to(ROOT)}: {cmd}")
            out += [text[pos:start], fresh]
            pos = end
        new = "".join(out) + text[pos:]
        if new != text and not check:
            doc.write_text(new)
    if check and stale:
        print("figures out of date (run scripts/figures):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    print(f"{n} figures {'checked' if check else 'regenerated'}" + (f", {len(stale)} changed" if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
