"""The import layers of docs/architecture.md, checked on the source (every .py file, parsed with ast).

One way: data (datamodules) and the module (lightning_modules) never meet except in the CLI;
the module reaches the ops only through its networks:

- ops/ imports neither Lightning, torchmetrics, the data nor the module;
- datamodules/ imports neither the module (networks included) nor the ops;
- lightning_modules/ outside networks/ and cli.py does not import the ops;
- lightning_modules/networks/ imports neither the data nor the LightningModule's files;
- lightning_modules/networks/ imports nothing of lightning_modules/ outside networks/ (the networks
  are the lowest layer of lightning_modules: what they need, such as safe weight loading, lives in
  networks/);
- the shared file helpers (`LEAVES`: atomic writes, safe checkpoint loads) import nothing of the project.
- no module imports another module's private (`_name`) names.

Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("ops", "datamodules", "lightning_modules")
# The LightningModule side of lightning_modules: what the networks must not depend on.
MODULE_FILES = (
    "classifier",
    "cli",
    "evaluation",
    "reports",
    "augment",
    "callbacks",
    "trainer",
    "predict",
    "arguments",
    "data_commands",
)
# Imported from several layers (safe_io by the data and the module side, checkpoint_file by the
# networks and the module side): a project import here could close a cycle or break a layer rule.
LEAVES = ("datamodules/safe_io.py", "lightning_modules/networks/checkpoint_file.py")


@dataclass(frozen=True)
class Import:
    file: str  # path relative to the repository
    line: int
    module: str  # absolute dotted name of the imported module
    names: tuple[str, ...]  # names taken from it (from-imports), else ()

    def __str__(self) -> str:
        what = f"from {self.module} import {', '.join(self.names)}" if self.names else f"import {self.module}"
        return f"{self.file}:{self.line}: {what}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[Import]:
    """Every import statement of `path`, relative ones resolved to absolute module names."""
    rel = str(path.relative_to(REPO))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=rel)):
        if isinstance(node, ast.Import):
            out += [Import(rel, node.lineno, a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            names = tuple(a.name for a in node.names)
            if not node.module and node.level:  # `from . import x`: x are submodules or names
                out += [Import(rel, node.lineno, f"{module}.{n}", ()) for n in names]
            else:
                out.append(Import(rel, node.lineno, module, names))
    return out


def _all_imports() -> list[Import]:
    files = sorted(f for pkg in PACKAGES for f in (REPO / pkg).rglob("*.py"))
    assert len(files) > 20, files  # the packages are there
    return [imp for f in files for imp in _imports(f)]


def _top(module: str) -> str:
    return module.split(".")[0]


def _violations(imports: list[Import]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {
        "ops imports Lightning, torchmetrics, data or module": [],
        "datamodules imports the module, networks or ops": [],
        "lightning_modules (outside networks/ and cli.py) imports ops": [],
        "networks import the data or the LightningModule side": [],
        "private names imported from another module": [],
        "networks import lightning_modules outside networks/": [],
        "the shared file helpers import the project": [],
    }
    keys = list(found)
    for imp in imports:
        top, file = _top(imp.module), imp.file
        if file.startswith("ops/") and top in ("lightning", "pytorch_lightning", "torchmetrics", *PACKAGES[1:]):
            found[keys[0]].append(str(imp))
        if file.startswith("datamodules/") and top in ("lightning_modules", "ops"):
            found[keys[1]].append(str(imp))
        in_module = file.startswith("lightning_modules/") and not file.startswith("lightning_modules/networks/")
        if in_module and file != "lightning_modules/cli.py" and top == "ops":
            found[keys[2]].append(str(imp))
        if file.startswith("lightning_modules/networks/") and (
            top == "datamodules" or imp.module in {f"lightning_modules.{m}" for m in MODULE_FILES}
        ):
            found[keys[3]].append(str(imp))
        private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
        if private and top in PACKAGES:
            found[keys[4]].append(str(imp))
        in_networks = imp.module == "lightning_modules.networks" or imp.module.startswith("lightning_modules.networks.")
        if file.startswith("lightning_modules/networks/") and top == "lightning_modules" and not in_networks:
            found[keys[5]].append(str(imp))
        if file in LEAVES and top in PACKAGES:
            found[keys[6]].append(str(imp))
    return found


@pytest.mark.parametrize(
    "rule",
    [
        "ops imports Lightning, torchmetrics, data or module",
        "datamodules imports the module, networks or ops",
        "lightning_modules (outside networks/ and cli.py) imports ops",
        "networks import the data or the LightningModule side",
        "private names imported from another module",
        "networks import lightning_modules outside networks/",
        "the shared file helpers import the project",
    ],
)
def test_import_layers(rule):
    bad = _violations(_all_imports())[rule]
    assert not bad, f"{rule}:\n" + "\n".join(bad)


def test_the_checker_sees_each_kind_of_violation(tmp_path):
    """The rules fire on made-up imports (relative, lazy, aliased), so a passing check means something."""
    fake = [
        Import("ops/sifa/modules.py", 3, "lightning.pytorch", ("LightningModule",)),
        Import("ops/repflow/functional.py", 9, "torchmetrics", ()),
        Import("datamodules/base.py", 5, "lightning_modules.networks", ("SIFAResNet",)),
        Import("lightning_modules/classifier.py", 400, "ops", ("FlowLayer",)),
        Import("lightning_modules/networks/base.py", 7, "lightning_modules.classifier", ("VideoClassifier",)),
        Import("lightning_modules/cli.py", 35, "lightning_modules.classifier", ("_gather_objects",)),
        Import("lightning_modules/networks/pretrained.py", 135, "lightning_modules.io", ("load_checkpoint_file",)),
        Import("lightning_modules/networks/frame.py", 4, "lightning_modules", ("VideoClassifier",)),
        Import("lightning_modules/networks/pretrained.py", 30, "lightning_modules.networks.checkpoint_file", ()),
        Import("datamodules/safe_io.py", 12, "datamodules.files", ("open_text",)),
        Import("lightning_modules/networks/checkpoint_file.py", 9, "lightning_modules.networks.base", ()),
    ]
    found = _violations(fake)
    # networks/base.py's import of the classifier breaks both networks rules; the last import is allowed.
    assert [len(v) for v in found.values()] == [2, 1, 1, 1, 1, 3, 2]
    # The parser resolves relative and in-function imports.
    pkg = tmp_path / "lightning_modules" / "networks"
    pkg.mkdir(parents=True)
    src = pkg / "x.py"
    src.write_text(
        "def f():\n    from ..classifier import _private\n    from . import base\n    import ops.sifa\n",
        encoding="utf-8",
    )
    global REPO
    saved, REPO = REPO, tmp_path
    try:
        got = {(i.module, i.names) for i in _imports(src)}
    finally:
        REPO = saved
    assert got == {
        ("lightning_modules.classifier", ("_private",)),
        ("lightning_modules.networks.base", ()),
        ("ops.sifa", ()),
    }
