# Sourced by the scripts: make .venv (if missing) and install spatialtune into it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "spatialtune needs Python >= 3.11 (found: $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv" >&2
  "$PY" -m venv .venv
fi
# Reinstall only when the project metadata changed since the last install.
stamp=.venv/.spatialtune-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing spatialtune and its pinned dependencies into .venv" >&2
  log=$(mktemp)
  if ! { .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip &&
         .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "installation failed (log above)" >&2
    exit 1
  fi
  rm -f "$log"
  touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
