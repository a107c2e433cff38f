"""The trainer's folders show its architecture (issue 27): each folder a stage of a handful of
modules, no module so long that it holds two ideas without saying why, no function past a screen."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ROOT / "trainer"
MAX_MODULES = 8  # a folder's modules, __init__ aside
MAX_LINES = 400  # a module's, unless its docstring says why ("Over 400 lines: ...")
MAX_BODY = 60  # a function's statements, its docstring aside


def modules() -> list[Path]:
    return sorted(p for p in TRAINER.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_folder_holds_more_than_a_handful_of_modules():
    folders = {p.parent for p in modules()}
    crowded = {
        str(f.relative_to(ROOT)): n
        for f in folders
        if (n := len([p for p in f.glob("*.py") if p.name != "__init__.py"])) > MAX_MODULES
    }
    assert not crowded, crowded


def test_long_modules_say_why():
    unexplained = [
        str(p.relative_to(ROOT))
        for p in modules()
        if len(p.read_text().splitlines()) > MAX_LINES
        and f"Over {MAX_LINES} lines:" not in (ast.get_docstring(ast.parse(p.read_text())) or "")
    ]
    assert not unexplained, unexplained


def test_no_function_runs_past_a_screen():
    long = []
    for p in modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = node.body[1:] if ast.get_docstring(node) is not None else node.body
                if body and (n := body[-1].end_lineno - body[0].lineno + 1) > MAX_BODY:  # type: ignore[operator]
                    long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, long
