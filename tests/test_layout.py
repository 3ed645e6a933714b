"""The package's layout holds: imports run one way (config -> model -> io -> offload -> planning -> runtime -> stats ->
generate -> cli), so there is no import cycle, and no module imports another's private name.

The import graph is read from the source (every import statement, function-level ones included), not from what
Python happens to have loaded."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "moepic_jax"
# Rank of each top-level part: a module may import parts of its own rank or lower only (same-rank imports must not
# form a cycle, which test_no_import_cycle checks).
RANKS = {"config": 0, "sampling": 0, "model": 1, "io": 2, "offload": 3, "planning": 4, "runtime": 5, "stats": 6,
         "generate": 7, "cli": 8, "__init__": 9}


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: pathlib.Path):
    """(module imported, names imported from it) for every import statement of a file."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]


def package_graph() -> dict[str, set[str]]:
    mods = {module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in mods.items():
        deps = set()
        for mod, names in imports_of(path):
            if not mod.startswith("moepic_jax"):
                continue
            # `from moepic_jax.offload import cache` imports the submodule moepic_jax.offload.cache
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in mods]
            deps.update(subs or [mod])
        graph[name] = deps - {name}
    return graph


def part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycle():
    graph = package_graph()
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if d not in graph:
                continue
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
    assert sum(map(len, graph.values())) > 50  # the graph was read: the package's modules import each other


def test_imports_run_one_way():
    bad = []
    for m, deps in package_graph().items():
        for d in deps:
            if m != "moepic_jax" and d != "moepic_jax" and RANKS[part(d)] > RANKS[part(m)]:
                bad.append(f"{m} imports {d}")
    assert not bad, bad


def test_every_part_has_a_rank():
    assert {part(m) for m in package_graph()} <= set(RANKS)


@pytest.mark.parametrize("folder", ["moepic_jax", "tools", "benchmarks", "tests"])
def test_no_private_names_imported_across_modules(folder):
    bad = []
    for path in (ROOT / folder).rglob("*.py"):
        for mod, names in imports_of(path):
            if mod.startswith("moepic_jax"):
                bad += [f"{path.relative_to(ROOT)}: from {mod} import {n}" for n in names if n.startswith("_")]
    assert not bad, bad


def test_the_wheel_ships_every_file_of_the_embedded_checkpoint():
    """pyproject's data-files list the embedded model file by file (setuptools takes no recursive globs): it must
    name exactly the files under checkpoints/, or an installed wheel cannot load the default model."""
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    listed = {f for files in data.values() for f in files}
    present = {str(p.relative_to(ROOT)) for p in (ROOT / "checkpoints").rglob("*") if p.is_file()}
    assert listed == present
    assert all(dest == "share/moepic_jax/" + str(pathlib.Path(files[0]).parent) for dest, files in data.items())
