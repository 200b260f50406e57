"""The import graph runs one way: the library never depends on a toy setup or a command line, and has no circles.

Every ``import`` in ``salt_ref/`` and ``toy/`` is read with ``ast`` (imports inside functions too: a lazy import
is still a dependency). Rules:

- nothing in ``salt_ref/`` imports ``toy`` except the command lines (``salt_ref.train``, ``salt_ref.sample``);
- no setup or benchmark imports a command line;
- no module imports another module's private (``_``-prefixed) name;
- the graph of module imports has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIS = {"salt_ref.train", "salt_ref.sample", "salt_ref.encode_prompts", "salt_ref.convert"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ("salt_ref", "toy"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, known: set[str]) -> list[tuple[str, str | None]]:
    """``(module, name)`` for every import of a project module (``name`` for ``from m import name``)."""
    found = []
    tree = ast.parse(path.read_text())
    hints_only = {  # `if TYPE_CHECKING:` imports are type hints, not dependencies at run time
        id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
        for child in node.body for n in ast.walk(child)
    }  # fmt: skip
    for node in ast.walk(tree):
        if id(node) in hints_only:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] in ("salt_ref", "toy")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("salt_ref", "toy"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.append((sub, None) if sub in known else (node.module, a.name))
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {dep for dep, _ in _imports(p, set(mods)) if dep != m} for m, p in mods.items()}


def test_the_library_does_not_import_toy_except_the_command_lines():
    bad = [
        (m, d)
        for m, deps in _graph().items()
        if m.startswith("salt_ref") and m not in CLIS
        for d in deps
        if d.startswith("toy")
    ]
    assert bad == []


def test_no_setup_imports_a_command_line():
    bad = [(m, d) for m, deps in _graph().items() if m.startswith("toy") for d in deps if d in CLIS]
    assert bad == []


def test_no_private_name_crosses_a_module():
    mods = _modules()
    bad = [
        (m, f"{dep}.{name}")
        for m, p in mods.items()
        for dep, name in _imports(p, set(mods))
        if name is not None and name.startswith("_") and dep != m
    ]
    assert bad == []


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if d not in graph:
                continue
            if state.get(d) == 1:
                return path + [m, d]
            if d not in state and (cycle := visit(d, path + [m])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            assert (cycle := visit(m, [])) is None, " -> ".join(cycle)
