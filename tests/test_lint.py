"""Code habits, checked in the suite (so CI fails on them): ruff's rules from pyproject.toml, and no
long functions in the library and tools."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80
# Today's functions over the limit (def line to last line): each may only shrink; split one and drop it here.
LONG_FUNCTIONS = {
}


def test_ruff_check_is_clean():
    got = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    if "No module named ruff" in got.stderr:
        pytest.fail("ruff is not installed: pip install -r requirements.txt (it pins ruff)")
    assert got.returncode == 0, f"ruff check . found violations (fix them; config in pyproject.toml):\n{got.stdout}"


def function_lengths(root: Path):
    """``{"path::Qualified.name": lines}`` for every function and method under ``root``'s vfmkd/ and tools/."""
    out = {}
    for folder in ("vfmkd", "tools"):
        for path in sorted((root / folder).rglob("*.py")):
            _collect(ast.parse(path.read_text(encoding="utf-8")), f"{path.relative_to(root).as_posix()}::", out)
    return out


def _collect(node: ast.AST, prefix: str, out: dict) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if not isinstance(child, ast.ClassDef):
                out[prefix + child.name] = child.end_lineno - child.lineno + 1
            _collect(child, prefix + child.name + ".", out)
        else:
            _collect(child, prefix, out)


def test_no_function_over_80_lines_outside_benchmarks():
    lengths = function_lengths(REPO)
    too_long = {k: n for k, n in lengths.items() if n > max(MAX_FUNCTION_LINES, LONG_FUNCTIONS.get(k, 0))}
    assert not too_long, (f"functions over {MAX_FUNCTION_LINES} lines (or longer than their allow-listed length); "
                          f"split them: {too_long}")
    stale = {k: n for k, n in LONG_FUNCTIONS.items() if lengths.get(k, 0) < n}
    assert not stale, f"allow-listed functions that shrank or went: lower or drop their LONG_FUNCTIONS entries: {stale}"


def test_function_length_check_sees_a_long_method(tmp_path):
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "vfmkd").mkdir()
    (tmp_path / "tools").mkdir()
    (tmp_path / "vfmkd" / "m.py").write_text(f"class A:\n    def f(self):\n{body}\n\n    def g(self):\n        pass\n")
    assert function_lengths(tmp_path) == {"vfmkd/m.py::A.f": MAX_FUNCTION_LINES + 1, "vfmkd/m.py::A.g": 2}
