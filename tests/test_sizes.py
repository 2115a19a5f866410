"""Size limits that keep weft readable: no class over 400 lines, no function over 80.

Counted from the first decorator to the last line, over every module of the package, so a
class or function that grows past them fails here instead of in a reviewer's head.
"""

from __future__ import annotations

import ast
from pathlib import Path

import weft

MAX_CLASS_LINES = 400
MAX_FUNCTION_LINES = 80


def _sizes() -> list[tuple[str, int, str]]:
    root = Path(weft.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                assert node.end_lineno is not None
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                where = f"{path.relative_to(root.parent)}:{first} {node.name}"
                found.append((kind, node.end_lineno - first + 1, where))
    return found


def test_the_scan_sees_the_package() -> None:
    names = {where.rsplit(" ", 1)[1] for _, _, where in _sizes()}
    assert {"Agent", "Membership", "place_experts", "run_agent"} <= names


def test_no_class_over_400_lines_and_no_function_over_80() -> None:
    limits = {"class": MAX_CLASS_LINES, "function": MAX_FUNCTION_LINES}
    too_long = [f"{kind} {n} lines: {where}" for kind, n, where in _sizes() if n > limits[kind]]
    assert not too_long, too_long
