"""The test suite's own layout: test modules share code only through tests/helpers/.

A test module that imports another test module (or conftest) runs that module's imports and fixtures in
its own namespace, collects nothing new, and breaks when the other file is renamed or split; shared
pieces live in helpers/ (imported as ``helpers``), fixtures in conftest.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_test_module(name: str) -> bool:
    top = name.split(".")[0]
    return top == "conftest" or top.startswith("test_") or (top == "tests" and not name.startswith("tests.helpers"))


def imports_of_test_modules(source: str, filename: str) -> list[str]:
    """``file:line module`` for each import (at any depth, relative or absolute) of a test module or conftest."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # `from . import test_x` / `from .conftest import y`
                names = [node.module] if node.module else [alias.name for alias in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        found += [f"{filename}:{node.lineno} {name}" for name in names if _is_test_module(name)]
    return found


def test_no_test_module_imports_another_test_module_or_conftest():
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        rel = path.relative_to(TESTS.parent).as_posix()
        found += imports_of_test_modules(path.read_text(encoding="utf-8"), rel)
    assert not found, "import shared pieces from tests/helpers/ instead:\n" + "\n".join(found)


def test_the_check_sees_each_form_of_import():
    source = (
        "from test_classifier import TinyNet\n"
        "import conftest\n"
        "def f():\n    from tests.test_sifa_kernels import CASES\n    from . import test_augment\n"
        "from .conftest import shared_videos\n"
        "from helpers.classifier import TinyNet\nfrom tests.helpers import REPO_ROOT\nimport testing_tools\n"
    )
    assert sorted(imports_of_test_modules(source, "t.py")) == [
        "t.py:1 test_classifier",
        "t.py:2 conftest",
        "t.py:4 tests.test_sifa_kernels",
        "t.py:5 test_augment",
        "t.py:6 conftest",
    ]
