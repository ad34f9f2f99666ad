"""The size limits of the house (issue 18): in src/, no file over 450 lines and no function over 80.

A long function is a design waiting to be found; these limits keep each module readable at once
(docs/contributing.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80


def long_functions(path: Path) -> list[str]:
    """``path:line name (N lines)`` for each function or method of ``path`` longer than ``MAX_FUNCTION_LINES``,
    counted from its ``def`` line to its last line (decorators not counted)."""
    return [
        f"{path.name}:{node.lineno} {node.name} ({length} lines)"
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and (length := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES
    ]


def test_the_check_catches_a_long_function(tmp_path):
    body = "".join(f"\n        x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1))
    module = tmp_path / "m.py"
    module.write_text(f"class C:\n    def fits(self):{body}\n\n    def too_long(self):{body}\n        y = 0\n")
    assert [f.split()[1] for f in long_functions(module)] == ["too_long"]


def test_no_file_in_src_is_over_450_lines():
    lines = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    too_long = {name: n for name, n in lines.items() if n > MAX_FILE_LINES}
    assert lines and not too_long, f"split these by concern: {too_long}"


def test_no_function_in_src_is_over_80_lines():
    too_long = [f for p in sorted(SRC.rglob("*.py")) for f in long_functions(p)]
    assert not too_long, "find the design in these: " + "; ".join(too_long)
