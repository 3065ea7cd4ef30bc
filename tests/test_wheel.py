"""The package as a user gets it: a wheel built from this checkout, installed into a fresh virtual
environment outside it, and ``pytest --lora-bench -m lora_params`` run in an empty directory.

The new environment sees this one's site-packages through a ``.pth`` file, for the dependencies
only: what is under test is the wheel (the plugin, its entry point, the suites it ships, the
default matrix and the registry's config files), not pip's resolver. Packages of this environment
come after the wheel's on ``sys.path``, and the test checks that the plugin and the suites it ran
came from the new environment.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("pyproject.toml", "README.md", "pytest_lora", "suites")


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def build_wheel(directory: Path) -> Path:
    source = directory / "source"
    for name in SHIPPED:
        origin = ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            source.mkdir(parents=True, exist_ok=True)
            shutil.copy(origin, source / name)
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", directory / "dist", source)
    (wheel,) = (directory / "dist").glob("pytest_lora-*.whl")
    return wheel


def fresh_environment(directory: Path) -> Path:
    """A virtual environment whose own site-packages come first, then this one's (dependencies)."""
    run(sys.executable, "-m", "venv", "--without-pip", directory)
    python = directory / "bin" / "python"
    own = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    ours = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    ours.append(sysconfig.get_paths()["purelib"])
    (own / "dependencies-of-the-test.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    return python


@pytest.mark.slow
def test_the_wheel_runs_the_bench_in_an_empty_directory(tmp_path):
    wheel = build_wheel(tmp_path / "build")
    names = set(run(sys.executable, "-m", "zipfile", "-l", wheel).stdout.split())
    assert {"pytest_lora/suites/test_params.py", "pytest_lora/suites/conftest.py", "pytest_lora/default_matrix.toml"} <= names
    python = fresh_environment(tmp_path / "venv")
    run(python, "-m", "pip", "install", "--quiet", "--no-deps", wheel)
    project = tmp_path / "project"
    project.mkdir()
    found = "import pytest_lora, pytest_lora.bench as b; print(pytest_lora.__file__); print(b.builtin_suites())"
    where = run(python, "-c", found, cwd=project).stdout.split()
    assert all(Path(path).is_relative_to(tmp_path / "venv") for path in where), where

    result = run(python, "-m", "pytest", "--lora-bench", "-m", "lora_params", "--lora-device=cpu", "--lora-quant=bf16,nf4", "-p", "no:cacheprovider", "-q", cwd=project)
    assert " passed" in result.stdout and " failed" not in result.stdout
    latest = json.loads((project / "results" / "latest.json").read_text())
    assert latest["run"]["status"] == "passed"
    suites = {record["suite"] for record in latest["records"]}
    assert suites == {"params"} and len(latest["records"]) > 10  # 3 models x 2 formats x 2 target sets, and the published counts
    assert all(record["test"].startswith("suites/test_params.py::") for record in latest["records"])  # as from a checkout
    # nothing else is written into the project (pytest-benchmark makes .benchmarks/ in every pytest run)
    assert {p.name for p in project.iterdir()} - {".benchmarks"} == {"results"}

    # the console script: the run against itself passes the gate, its numbers export for github-action-benchmark
    script = python.parent / "pytest-lora"
    compared = run(script, "compare", project / "results" / "latest.json", project / "results", cwd=project)
    assert "checks on" in compared.stdout and "no regression" in compared.stdout
    run(script, "export", "--format", "gab", project / "results", "-o", tmp_path / "gab", cwd=project)
    assert json.loads((tmp_path / "gab" / "customSmallerIsBetter.json").read_text()) == []  # counts are exact, not charted
