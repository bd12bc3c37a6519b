"""The package's layout: a module imports only from its own floor or below, and nothing imports in a circle.

The floors, lowest first; README's Development section lists the same (a test below checks that it does).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fluxnb"
FLOORS = [
    ("base", ["base"]),
    ("configuration", ["config"]),
    ("the offline stand-in", ["tiny"]),
    ("machine and run", ["run"]),
    ("pipeline parts", ["data", "model"]),
    ("training", ["train"]),
    ("inference", ["infer"]),
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


def test_the_package_top_holds_at_most_five_modules():
    assert len([p for p in PACKAGE.glob("*.py")]) <= 5, sorted(p.name for p in PACKAGE.glob("*.py"))


def test_no_module_over_300_lines_and_no_function_over_60():
    long = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > 300:
            long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1}")
    assert not long, long


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


def mentions(text: str) -> set[str]:
    """`fluxnb.a.b` names in a text (prose, docstrings, comments), without a trailing dot or call."""
    import re

    return {m.rstrip(".") for m in re.findall(r"\bfluxnb(?:\.[A-Za-z_][A-Za-z0-9_]*)+", text)}


def resolves(name: str) -> bool:
    """fluxnb.x.y names a module, or something a module defines (fluxnb.x.y.z: an attribute of an attribute)."""
    import importlib

    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_fluxnb_name_in_the_code_and_docs_exists():
    """Docstrings, comments and the README name fluxnb's modules and functions as they are now (stale paths
    such as fluxnb.step for fluxnb.train.step outlive a move otherwise)."""
    texts = [*PACKAGE.rglob("*.py"), ROOT / "README.md", *(ROOT / "benchmarks").glob("*.py")]
    stale = sorted({f"{path.relative_to(ROOT)}: {name}" for path in texts for name in mentions(path.read_text())
                    if not resolves(name)})
    assert not stale, "\n".join(stale)
