"""The arrows between the package's rooms (ARCHITECTURE.md): import-linter's contracts in
pyproject.toml hold, a planted back-arrow breaks them, and no module imports itself through others
(a circle), function-level imports included (grimp reads every import statement in the source)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

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


def test_the_import_contracts_hold():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Contracts: 4 kept, 0 broken." in done.stdout


def test_a_planted_back_arrow_breaks_its_contract(tmp_path):
    """``models.heap`` imports ``measure.cpu``: the model builder would know how the CPU is measured."""
    root = copy_of_the_package(tmp_path)
    heap = root / "pytest_lora" / "models" / "heap.py"
    heap.write_text(heap.read_text() + "\nfrom ..measure import cpu  # noqa: E402,F401\n")
    done = lint_imports(root)
    assert done.returncode == 1
    assert "models build bases and adapters: nothing of measuring, results, pytest's face or\nxdist BROKEN" in done.stdout
    assert "pytest_lora.models.heap -> pytest_lora.measure.cpu" in done.stdout


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
