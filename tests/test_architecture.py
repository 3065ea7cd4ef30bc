"""The arrows between the package's rooms (ARCHITECTURE.md): import-linter's contracts in
pyproject.toml hold, a planted back-arrow breaks them, and no module imports itself through others
(a circle), function-level imports included (grimp reads every import statement in the source)."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter on the package under ``root`` with ``root``'s pyproject.toml."""
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}, capture_output=True, text=True)


def circles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every import that leads back to its importer, as the chain that closes the circle."""
    found = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain is not None:
                found.append([module, *chain])
    return found


def copy_of_the_package(tmp_path: Path) -> Path:
    """The package's source and pyproject.toml under ``tmp_path``, to plant an import in."""
    shutil.copytree(ROOT / "pytest_lora", tmp_path / "pytest_lora", ignore=shutil.ignore_patterns("__pycache__", "configs"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


CONTRACTS = 9


def contract_verdicts(report: str) -> dict[str, str]:
    """The start of each contract's name (up to its colon) -> KEPT or BROKEN, from lint-imports' output."""
    listing = report.split(" dependencies. ", 1)[1].split(" Contracts: ", 1)[0]
    verdicts = re.findall(r"-*\s*(.+?) (KEPT|BROKEN)", listing)
    return {name.split(":")[0].strip("- "): verdict for name, verdict in verdicts}


def test_the_import_contracts_hold():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"Contracts: {CONTRACTS} kept, 0 broken." in done.stdout
    assert len(contract_verdicts(" ".join(done.stdout.split()))) == CONTRACTS


PLANTED = {
    # module that gains the import, the import, the contract it breaks (the start of its name)
    "the model builder would know how the CPU is measured": ("models/heap.py", "from ..measure import cpu", "models build bases and adapters"),
    "the store would know the gate's rules": ("results/store.py", "from ..gate import rules", "results keep records"),
    "the gate would render with the report's tables": ("gate/compare.py", "from ..report import table", "the gate judges records"),
    "the journal would judge what it carries": ("dist/journal.py", "from ..gate import compare", "dist runs xdist and shards"),
}


@pytest.mark.parametrize("why", list(PLANTED))
def test_a_planted_back_arrow_breaks_its_contract(tmp_path, why):
    path, statement, contract = PLANTED[why]
    root = copy_of_the_package(tmp_path)
    module = root / "pytest_lora" / path
    module.write_text(module.read_text() + f"\n{statement}  # noqa: E402,F401\n")
    done = lint_imports(root)
    assert done.returncode == 1
    report = " ".join(done.stdout.split())  # import-linter wraps its lines to the terminal
    assert contract_verdicts(report)[contract] == "BROKEN", report
    importer = "pytest_lora." + path.removesuffix(".py").replace("/", ".")
    assert f"{importer} -> pytest_lora." in report


def test_no_module_imports_itself_through_others():
    assert circles(grimp.build_graph("pytest_lora", cache_dir=None)) == []


def test_a_planted_circle_is_found(tmp_path):
    """``report.table`` imports ``report.headline``, which imports ``report.table``."""
    root = copy_of_the_package(tmp_path)
    table = root / "pytest_lora" / "report" / "table.py"
    table.write_text(table.read_text() + "\n\ndef planted():\n    from . import headline  # noqa: F401\n")
    code = ("import grimp, json, sys; sys.path.insert(0, sys.argv[1]); from test_architecture import circles; "
            "print(json.dumps(circles(grimp.build_graph('pytest_lora', cache_dir=None))))")
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], cwd=root, env={"PYTHONPATH": str(root)},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ["pytest_lora.report.table", "pytest_lora.report.headline", "pytest_lora.report.table"] in json.loads(done.stdout)


def test_each_recipe_of_architecture_md_names_the_test_that_follows_it():
    """The four recipes (format, suite, kind of metric, headline table) each name a test of
    tests/ that exists: the recipe as written is the recipe that is checked."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    recipes = text.split("## Recipes", 1)[1]
    named = re.findall(r"^\*\*(.+?)\*\* \(`(tests/\w+\.py)::(\w+)`\)", recipes, re.M)
    assert [what for what, _, _ in named] == ["A storage format", "A suite", "A kind of metric for the gate", "A headline table"]
    for _, path, test in named:
        tree = ast.parse((ROOT / path).read_text())
        assert test in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, f"{path}::{test}"
