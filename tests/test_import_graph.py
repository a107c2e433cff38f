"""The packages' import graph has no circles, counting imports inside functions too: a lazy import
that dodges a circle hides a module holding two ideas (house style, habit 14). Imports under
`if TYPE_CHECKING:` are for annotations only and never run, so they do not count."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "serving")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `path` imports anywhere, except under `if TYPE_CHECKING:`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from trainer import plots`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "gen" not in p.relative_to(ROOT).parts]
    known = {module_name(p) for p in files}
    return {module_name(p): imports(p, known) - {module_name(p)} for p in files}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


class TestFindCycle:
    def test_finds_a_circle(self):
        assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]

    def test_a_diamond_is_not_a_circle(self):
        assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None


def test_the_import_graph_has_no_circles():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("lazy_importer", ["trainer.learn.learner", "trainer.data.loaders"])
def test_the_modules_that_once_dodged_a_circle_import_nothing_that_imports_them(lazy_importer):
    edges = graph()
    assert all(lazy_importer not in edges[m] for m in edges[lazy_importer])


# What the trainer may import from serving: the bundle it writes and the server loads (serving.bundle:
# manifest, files, preprocessing, the ONNX session and probabilities through it, the CPU count both
# size their threads by) and the model repository's layout it publishes into.
CONTRACT = ("serving.bundle", "serving.repository.layout")
# trainer.demo's last step serves the model it trained, in-process: the one place that runs both.
MAY_SERVE = {"trainer.demo"}


def test_the_trainer_imports_only_the_contract_from_serving():
    edges = graph()
    beyond = {
        f"{module} imports {target}"
        for module, targets in edges.items()
        if module.startswith("trainer") and module not in MAY_SERVE
        for target in targets
        if target.startswith("serving") and not target.startswith(CONTRACT)
    }
    assert not beyond, sorted(beyond)
