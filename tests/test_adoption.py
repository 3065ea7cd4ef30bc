"""Using the plugin in someone else's project: marker names it must not capture, ini values as
pyproject.toml writes them, paths relative to where they were written, results written only when
asked, and values ``record`` takes as any torch user would pass them."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from pytest_lora import bench
from pytest_lora.results.recorder import Recorder

USERS_MEMORY_TEST = """
import pytest

@pytest.mark.memory
def test_my_cache_stays_small():
    assert True
"""

MEMORY_SUITE = """
import pytest

pytestmark = pytest.mark.lora_memory

def test_suite_memory():
    assert True
"""


def test_a_users_memory_marker_is_never_captured(pytester, suite):
    """A project's own ``memory`` marker: its test runs (no bench needed), ``-m memory`` selects
    it and not the suite, and the run says where the suite went."""
    suite(MEMORY_SUITE, name="test_suite_memory.py")
    pytester.makepyfile(test_mine=USERS_MEMORY_TEST)
    pytester.runpytest("test_mine.py", "-rs").assert_outcomes(passed=1)
    result = pytester.runpytest("--lora-bench", "-m", "memory", "suites", "test_mine.py")
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.fnmatch_lines(["*-m memory selects this project's own marker; pytest-lora's suite is -m lora_memory*"])
    pytester.runpytest("--lora-bench", "-m", "lora_memory", "suites", "test_mine.py").assert_outcomes(passed=1, deselected=1)


def test_a_registered_short_name_is_left_to_the_project(pytester, suite):
    """Registered in the project's ini (even with no test using it yet): no alias."""
    suite(MEMORY_SUITE, name="test_suite_memory.py")
    pytester.makeini("[pytest]\nlora_matrix = pinned.toml\nmarkers =\n    memory: ours\n")
    pytester.runpytest("--lora-bench", "-m", "memory").assert_outcomes(deselected=1)
    pytester.runpytest("--lora-bench", "-m", "lora_memory").assert_outcomes(passed=1)


def test_without_a_project_marker_the_short_name_selects_the_suite(pytester, suite):
    suite(MEMORY_SUITE, name="test_suite_memory.py")
    pytester.runpytest("--lora-bench", "-m", "memory", "--strict-markers").assert_outcomes(passed=1)


PARAMETRIZED = """
def test_case(model_spec, quant_spec, lora_spec):
    pass
"""


def write_config(directory, name="tiny"):
    from pytest_lora.models import registry

    (directory / name).mkdir(parents=True)
    (directory / name / "config.json").write_text(json.dumps(registry.load_config_dict("llama-3.2-1b-tiny")))


def test_native_toml_lists_and_ini_paths_relative_to_the_ini_file(pytester, monkeypatch):
    """``lora_ranks = [4, 8]`` in pyproject.toml, and a model path from the ini, run from a subdirectory."""
    write_config(pytester.path / "configs")
    pytester.makepyprojecttoml(textwrap.dedent("""
        [tool.pytest.ini_options]
        lora_ranks = [4, 8]
        lora_quant = ["none", "nf4"]
        lora_targets = ["q_proj", "v_proj"]
        lora_models = "configs/tiny/config.json"
    """))
    pytester.makepyfile(test_case=PARAMETRIZED)
    (pytester.path / "sub").mkdir()
    monkeypatch.chdir(pytester.path / "sub")
    result = pytester.runpytest("--co", "-q", str(pytester.path / "test_case.py"))
    result.stdout.fnmatch_lines(["*test_case[[]tiny-none-r4-a8-q_proj+v_proj-*]", "*test_case[[]tiny-none-r8-a16-q_proj+v_proj-*]",
                                 "*test_case[[]tiny-nf4-r4-a8-q_proj+v_proj-*]", "*test_case[[]tiny-nf4-r8-a16-q_proj+v_proj-*]"])


def test_a_matrix_file_path_is_relative_to_the_file(pytester, monkeypatch):
    write_config(pytester.path / "configs")
    (pytester.path / "matrices").mkdir()
    (pytester.path / "matrices" / "m.toml").write_text('models = ["../configs/tiny/config.json"]\nquant = ["none"]\nranks = [4]\n')
    pytester.makepyfile(test_case=PARAMETRIZED)
    (pytester.path / "sub").mkdir()
    monkeypatch.chdir(pytester.path / "sub")
    result = pytester.runpytest("--co", "-q", "--lora-matrix=../matrices/m.toml", str(pytester.path / "test_case.py"))
    result.stdout.fnmatch_lines(["*test_case[[]tiny-*-r4-*]"])


def test_a_command_line_path_is_relative_to_the_invocation_directory(pytester, monkeypatch):
    write_config(pytester.path / "sub" / "configs")
    pytester.makepyfile(test_case=PARAMETRIZED)
    monkeypatch.chdir(pytester.path / "sub")
    result = pytester.runpytest("--co", "-q", "--lora-models=configs/tiny/config.json", "--lora-ranks=4", str(pytester.path / "test_case.py"))
    result.stdout.fnmatch_lines(["*test_case[[]tiny-*-r4-*]"])


def test_an_ini_list_where_a_flag_belongs_is_a_usage_error(pytester):
    pytester.makepyprojecttoml("[tool.pytest.ini_options]\nlora_bench = [1, 2]\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*lora_bench (ini):*allowed: true or false*"])


RECORDING_TEST = """
def test_records(lora_bench):
    lora_bench.record("answer", 42, "units")
"""


def test_a_plain_run_writes_nothing_unless_asked(pytester):
    pytester.makepyfile(test_mine=RECORDING_TEST)
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["pytest-lora: 1 records (1 ok), not written (--lora-bench or --lora-results=DIR writes them)"])
    assert not (pytester.path / "results").exists()
    pytester.runpytest("--lora-results=out").assert_outcomes(passed=1)
    assert json.loads((pytester.path / "out" / "latest.json").read_text())["records"][0]["metrics"] == {"answer": 42}
    pytester.makeini("[pytest]\nlora_results = kept\n")
    pytester.runpytest().assert_outcomes(passed=1)
    assert (pytester.path / "kept" / "latest.json").is_file()


def test_own_suites_run_beside_the_built_in_ones(pytester, suite):
    suite(MEMORY_SUITE, name="test_suite_memory.py")
    (pytester.path / "mine").mkdir()
    (pytester.path / "mine" / "test_my_suite.py").write_text(MEMORY_SUITE.replace("test_suite_memory", "test_my_memory"))
    result = pytester.runpytest("--lora-bench", "--lora-suites=mine", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_suite_memory PASSED*", "*test_my_memory PASSED*"], consecutive=False)
    result = pytester.runpytest("--lora-bench", "--lora-suites=nowhere")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--lora-suites: 'nowhere' is not a directory*allowed: directories of test files*"])


def test_the_built_in_suites_are_found_as_a_package():
    """``pytest_lora.suites``: the repository's suites/ in a checkout or an editable install."""
    assert (bench.builtin_suites() / "test_params.py").is_file()
    assert (bench.builtin_suites() / "__init__.py").is_file()


def test_a_bench_run_loads_no_conftest_of_the_projects_tests(pytester, suite):
    """With no path, the suites are the run's paths before pytest reads ``testpaths``: the
    project's (here, broken) test setup is never imported."""
    suite(MEMORY_SUITE, name="test_suite_memory.py")
    (pytester.path / "tests").mkdir()
    (pytester.path / "tests" / "conftest.py").write_text("raise RuntimeError('the tests were loaded')\n")
    pytester.makeini("[pytest]\ntestpaths = tests\nlora_matrix = pinned.toml\n")
    pytester.runpytest("--lora-bench").assert_outcomes(passed=1)


@pytest.mark.parametrize(
    "value, expected",
    [(3, 3), (2.5, 2.5), (np.float32(1.5), 1.5), (np.int64(7), 7), (torch.tensor(2.0), 2.0), (torch.tensor(5), 5),
     (np.array(4.0), 4.0), (torch.tensor(1.0, requires_grad=True) * 2, 2.0), (None, None)],
    ids=["int", "float", "np.float32", "np.int64", "tensor-0d", "tensor-0d-int", "ndarray-0d", "tensor-grad", "none"],
)
def test_record_takes_numbers_as_torch_and_numpy_give_them(value, expected):
    recorder = Recorder("s", "t", {})
    recorder.record("x", value, "u")
    assert recorder.metrics["x"] == expected and type(recorder.metrics["x"]) is type(expected)


@pytest.mark.parametrize(
    "value, message",
    [(torch.tensor([1.0, 2.0]), "got a torch.Tensor of shape (2,)"), (True, "got bool True"), ("1", "got str '1'"),
     (float("nan"), "got nan, which is not finite"), (torch.tensor(float("inf")), "got inf, which is not finite")],
    ids=["vector", "bool", "str", "nan", "inf-tensor"],
)
def test_record_names_what_it_got(value, message):
    with pytest.raises(ValueError, match="allowed: a finite int or float, a numpy scalar, a 0-d tensor or array, or None") as error:
        Recorder("s", "t", {}).record("x", value, "u")
    assert message in str(error.value)


def test_a_listing_checks_targets_from_the_cache_and_says_when_it_cannot(pytester):
    """``--co`` doesn't import transformers to build a model: with the module names not cached it
    says the check is left to the run; once a run has cached them, a listing catches a typo."""
    pytester.makepyfile(test_case=PARAMETRIZED)
    tiny = ("--lora-models=llama-3.2-1b-tiny", "--lora-quant=none", "--lora-ranks=4")
    result = pytester.runpytest("--co", *tiny, "--lora-targets=q_prj")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["lora: target modules not checked in this listing (*); a run checks them before any test"])
    pytester.runpytest(*tiny, "--lora-targets=q_proj", "-k", "nothing").assert_outcomes(deselected=1)  # caches them
    result = pytester.runpytest("--co", *tiny, "--lora-targets=q_prj")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*target 'q_prj' matches no Linear, Conv1D or Embedding of llama-3.2-1b-tiny*"])


def test_a_marker_path_is_relative_to_the_test_file(pytester, monkeypatch):
    write_config(pytester.path / "tests" / "configs")
    (pytester.path / "tests" / "test_case.py").write_text(
        "import pytest\n\n@pytest.mark.lora_matrix(models=['configs/tiny/config.json'], quant=['none'], ranks=[4])\n" + PARAMETRIZED
    )
    (pytester.path / "elsewhere").mkdir()
    monkeypatch.chdir(pytester.path / "elsewhere")
    result = pytester.runpytest("--co", "-q", str(pytester.path / "tests" / "test_case.py"))
    result.stdout.fnmatch_lines(["*test_case[[]tiny-none-r4-*]"])
