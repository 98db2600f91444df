"""The packages' imports, read with ast (those inside functions too): each points down the layers, and no two
modules import each other, however indirectly. From the bottom: pipeline and model; evaluation; engine; then
train.py and benchmarks."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"pipeline": 0, "model": 0, "evaluation": 1, "engine": 2, "train": 3, "benchmarks": 3}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    paths = [
        ROOT / "train.py",
        *(p for package in LAYERS if (ROOT / package).is_dir() for p in (ROOT / package).rglob("*.py")),
    ]
    return {module_name(p): p for p in paths if "results" not in p.parts}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, anywhere in it: `from a.b import c` counts as a.b.c where that is a
    module, else a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                for alias in node.names
            ]
        else:
            continue
        found |= {name for name in names if name.split(".")[0] in LAYERS and name in modules}
    return found


def test_every_import_points_down_the_layers():
    modules = project_modules()
    upward = []
    for name, path in modules.items():
        for imported in imports_of(path, modules):
            if LAYERS[imported.split(".")[0]] > LAYERS[name.split(".")[0]]:
                upward.append(f"{name} imports {imported}")
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    modules = project_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    cycles, state = [], {}

    def visit(name, trail):
        state[name] = "open"
        for imported in sorted(graph[name]):
            if state.get(imported) == "open":
                cycles.append(" -> ".join(trail[trail.index(imported) :] + [imported]))
            elif imported not in state:
                visit(imported, trail + [imported])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)
