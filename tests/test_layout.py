"""The package's layout: a module imports only from its own floor or below, and nothing imports in a circle.

The floors, lowest first; README's Development section lists the same (a test below checks that it does).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fluxnb"
FLOORS = [
    ("base", ["errors", "files", "config", "memory", "plots", "hub_errors"]),
    ("machine and run", ["hardware", "tiny", "tiny_captioner", "budget", "presets", "run", "lock"]),
    ("pipeline parts", ["data", "model"]),
    ("pipeline steps", ["train", "infer"]),
    ("sharing", ["share"]),
    ("front ends", ["nb", "cli", "__main__", "__init__"]),
]
FLOOR = {name: level for level, (_, names) in enumerate(FLOORS) for name in names}


def unit(module: str) -> str:
    """fluxnb.data.latents -> "data"; fluxnb.run -> "run": what a floor is made of."""
    return module.split(".")[1] if module.count(".") else "__init__"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """The fluxnb modules `name` imports, at the top or inside functions (a lazy import is still a dependency)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.startswith("fluxnb"):
                candidates = [f"{base}.{a.name}" for a in node.names]
                found |= {c if c in modules() else base for c in candidates}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fluxnb")}
    return {m for m in found if m != name}


def test_every_module_is_on_a_floor():
    assert {unit(m) for m in modules()} - {"fluxnb"} <= set(FLOOR) | {"__init__"}, "a new module needs a floor"


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_imports_only_its_floor_or_below(name):
    mine = FLOOR[unit(name)] if name != "fluxnb" else FLOOR["__init__"]
    above = sorted(m for m in imports(name, modules()[name]) if FLOOR[unit(m)] > mine)
    assert not above, f"{name} (floor {FLOORS[mine][0]!r}) imports from a higher floor: {above}"


def test_no_import_cycles():
    graph = {name: imports(name, path) for name, path in modules().items()}
    graph = {name: {d for d in deps if d in graph and not (name.startswith(d + ".") or d == "fluxnb")}
             for name, deps in graph.items()}  # a package's __init__ re-exporting its modules is no cycle
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                pytest.fail(f"import cycle: {' -> '.join(trail[trail.index(dep):] + [dep]) if dep in trail else dep}")
            if dep not in state:
                visit(dep, trail + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def readme_floors() -> str:
    return "\n".join(f"{level}. {title}: " + ", ".join(f"`{n}`" for n in names if n not in ("__main__", "__init__"))
                     for level, (title, names) in enumerate(FLOORS))


def test_readme_draws_the_floors_from_this_test():
    assert readme_floors() in (ROOT / "README.md").read_text(), f"README's Development section should list:\n{readme_floors()}"
