"""The Makefile: on a GPU host a Python that already has torch keeps its stack; the published runs
run the matrix they are published as."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def dry_run(tmp_path: Path, python: str) -> str:
    """What ``make install`` would run with ``python`` as the host's Python (nothing is run but the torch probe)."""
    done = subprocess.run(["make", "-n", "-B", "install", f"PYTHON={python}", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return " ".join(done.stdout.split())  # one space between words


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_host_python_with_torch_is_seen_by_the_venv(tmp_path):
    assert "import torch" in sys.modules or __import__("torch")  # this interpreter has torch
    commands = dry_run(tmp_path, sys.executable)
    assert f"-m venv --system-site-packages {tmp_path / 'venv'}" in commands
    assert '-c "import torch" 2>/dev/null || ' in commands  # the venv finds the host's torch: no torch==2.13.0 install
    assert "--upgrade" not in commands.split("pip install --quiet --upgrade pip", 1)[1]  # nothing of the host's is upgraded


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_host_python_without_torch_gets_a_venv_of_its_own(tmp_path):
    python = tmp_path / "python-without-torch"
    python.write_text("#!/bin/sh\nexit 1\n")
    python.chmod(0o755)
    commands = dry_run(tmp_path, str(python))
    assert f"-m venv {tmp_path / 'venv'}" in commands and "--system-site-packages" not in commands


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("args", [(), ("ARGS=--durations=30",)], ids=["plain", "with-args"])
def test_publish_real_runs_the_real_matrix_whatever_args_adds(tmp_path, args):
    """A user's ARGS is added to the real matrix: a command-line ARGS once replaced it, and the
    tiny matrix's run was written where the real model's belongs."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()  # up to date: make prints the run, not an install
    done = subprocess.run(["make", "-n", "publish-real", f"VENV={venv}", *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    [run] = [line for line in done.stdout.splitlines() if "-m pytest --lora-bench" in line]
    assert "--lora-matrix=real --lora-seeds=2" in run and "results/published/real" in done.stdout
    assert all(arg.split("=", 1)[1] in run for arg in args)
