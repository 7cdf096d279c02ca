"""The package's shape, checked from its source: dependencies point one way (from the CLI down to
the workloads), there is no import cycle, no module reads another module's private names, and no
module grows past about 400 lines. docs/architecture.md draws the same layers."""

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "spatialtune"

# The layers, lowest first. A package may import its own modules and anything in a lower layer;
# never a package of its own layer or above.
LAYERS = [
    {"errors"},
    {"terms"},
    {"cuda"},
    {"device", "workloads"},
    {"partitions", "neighbours"},
    {"store", "measure"},
    {"search"},
    {"lookup", "report", "tuning", "bundle", "distributed", "models"},
    {"cli"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
MAX_LINES = 420


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODS = modules()


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(mod: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in ``mod``, at any depth."""
    path = MODS[mod]
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("spatialtune")]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, is_pkg, node)
            if not target.startswith("spatialtune"):
                continue
            names = [a.name for a in node.names]
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODS]
            if subs:  # `from . import x` where x is a module
                out += [(s, [], node.lineno) for s in subs]
                names = [n for n in names if f"{target}.{n}" not in MODS]
            if names or not subs:
                out.append((target, names, node.lineno))
    return out


def package_of(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_package_has_a_layer():
    missing = sorted({package_of(m) for m in MODS if package_of(m)} - set(RANK))
    assert not missing, f"packages without a layer in LAYERS: {missing}"


def test_dependencies_point_down():
    wrong = []
    for mod in MODS:
        src = package_of(mod)
        if not src:
            continue  # spatialtune/__init__.py: lazy exports only
        for target, _, line in imports_of(mod):
            dst = package_of(target)
            if dst and dst != src and RANK[dst] >= RANK[src]:
                wrong.append(f"{mod}:{line} imports {target} ({src} is layer {RANK[src]}, {dst} is {RANK[dst]})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_no_import_cycle():
    graph = {m: sorted({t for t, _, _ in imports_of(m) if t in MODS and t != m}) for m in MODS}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_names_across_modules():
    bad = []
    for mod in MODS:
        for target, names, line in imports_of(mod):
            if target != mod:
                bad += [f"{mod}:{line} takes {target}.{n}" for n in names if n.startswith("_") and n != "__version__"]
        tree = ast.parse(MODS[mod].read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    full = f"{_resolve(mod, MODS[mod].name == '__init__.py', node)}.{a.name}"
                    if full in MODS and full != mod:
                        aliases[a.asname or a.name] = full
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                bad.append(f"{mod}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    assert not bad, "private names read across modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("mod", sorted(MODS))
def test_modules_stay_small(mod):
    n = len(MODS[mod].read_text().splitlines())
    assert n <= MAX_LINES, f"{mod} has {n} lines: split it along its ideas"


# One tuning loop (issue 25): a GPU round is ``tune`` with the bundle runner, so bundle/ packs,
# runs on the device and imports, and chooses no candidate, loads or fits no cost model and walks
# no share of its own.
ONE_LOOP = {"bundle": ("spatialtune.search.policy", "spatialtune.search.cost_model", "spatialtune.search.evolution",
                       "spatialtune.search.uniform", "spatialtune.tuning")}


def test_bundles_leave_the_tuning_to_tune():
    wrong = []
    for mod in MODS:
        banned = ONE_LOOP.get(package_of(mod), ())
        for target, _, line in imports_of(mod):
            if any(target == b or target.startswith(b + ".") for b in banned):
                wrong.append(f"{mod}:{line} imports {target}")
    assert not wrong, "a second tuning driver (tune is the one loop; bundles are its runner):\n" + "\n".join(wrong)


def test_the_checks_see_a_violation(tmp_path, monkeypatch):
    """The walker is not blind: an upward import, a cycle and a private import are all found."""
    fake = tmp_path / "spatialtune"
    (fake / "store").mkdir(parents=True)
    (fake / "search").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "store" / "__init__.py").write_text("")
    (fake / "search" / "__init__.py").write_text("")
    (fake / "store" / "a.py").write_text("from ..search.b import _hidden\n")
    (fake / "search" / "b.py").write_text("from ..store import a\n_hidden = 1\n")
    (fake / "bundle").mkdir()
    (fake / "bundle" / "__init__.py").write_text("")
    (fake / "bundle" / "c.py").write_text("from ..search.policy import SharePolicy\n")
    here = sys.modules[__name__]
    monkeypatch.setattr(here, "PKG", fake)
    monkeypatch.setattr(here, "MODS", modules())
    with pytest.raises(AssertionError, match="points up|up or sideways"):
        test_dependencies_point_down()
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycle()
    with pytest.raises(AssertionError, match="private names"):
        test_no_private_names_across_modules()
    with pytest.raises(AssertionError, match="bundle.c:1 imports spatialtune.search.policy"):
        test_bundles_leave_the_tuning_to_tune()


def test_the_cli_and_the_measuring_side_import_light():
    """A GPU host that runs bundles or serves measurements has a runtime-only TVM, numpy and
    cuda-bindings: neither the CLI, the measuring worker nor the measuring server may import the
    database layer, xgboost or the full TVM at start, and the lookup library loads no TVM at all."""
    import subprocess

    code = ("import sys, spatialtune.cli, spatialtune.measure.in_worker, spatialtune.bundle.run, spatialtune.lookup,"
            " spatialtune.distributed.server;"
            "print(sorted(m for m in ('tvm', 'sqlite_utils', 'xgboost', 'matplotlib', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
