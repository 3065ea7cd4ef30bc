"""Options end to end, through pytester: precedence, the report header, usage errors, markers,
and what --lora-bench selects."""

from __future__ import annotations

import json

import pytest

from pytest_lora.specs import QUANTIZATIONS

from conftest import TINY

pytest_plugins = ["pytester"]


def header_line(result: pytest.RunResult) -> str:
    """The report header's ``lora:`` lines, joined (it wraps at 120 columns)."""
    return " ".join(line.removeprefix("lora: ") for line in result.outlines if line.startswith("lora: "))


# --------------------------------------------------------------------------- precedence


@pytest.mark.parametrize(
    "cli, env, ini, expected",
    [
        ("int8", "bf16", "fp16", "quant=int8 [cli]"),
        (None, "bf16", "fp16", "quant=bf16 [env]"),
        (None, None, "fp16", "quant=fp16 [ini]"),
        (None, None, None, "quant=- [default]"),
    ],
)
def test_precedence_cli_env_ini_default(pytester, monkeypatch, cli, env, ini, expected):
    if ini:
        pytester.makeini(f"[pytest]\nlora_quant = {ini}\n")
    if env:
        monkeypatch.setenv("PYTEST_LORA_QUANT", env)
    args = ["--collect-only"] + ([f"--lora-quant={cli}"] if cli else [])
    pytester.makepyfile(test_q="def test_q(quant_spec):\n    pass\n")
    result = pytester.runpytest(*args)
    assert expected in header_line(result)
    winner = cli or env or ini
    if winner:  # the value that won is the one the tests are parametrized by
        result.stdout.fnmatch_lines([f"*test_q[[]{winner}[]]*"])
        assert sum("test_q[" in line for line in result.outlines) == 1


def test_every_option_has_an_env_variable_and_ini_key(pytester, monkeypatch, tmp_path):
    matrix = tmp_path / "m.toml"
    matrix.write_text('ranks = [4]\n')
    monkeypatch.setenv("PYTEST_LORA_MODELS", "opt-125m-tiny")
    monkeypatch.setenv("PYTEST_LORA_RANKS", "12")
    monkeypatch.setenv("PYTEST_LORA_MATRIX", str(matrix))
    pytester.makeini("[pytest]\nlora_targets = q_proj\nlora_device = cpu\nlora_results = out\n")
    pytester.makepyfile(test_q="def test_q(model_spec, lora_spec):\n    pass\n")
    result = pytester.runpytest("--collect-only")
    header = header_line(result)
    for part in ("models=opt-125m-tiny [env]", "ranks=12 [env]", "targets=q_proj [ini]", "device=cpu [ini]", "results=out [ini]", "bench=off [default]"):
        assert part in header
    # the single option beats the matrix file, which beats the default matrix
    result.stdout.fnmatch_lines(["*test_q[[]opt-125m-tiny-r12-a24-q_proj-d0.05[]]*"])


def test_matrix_file_sets_keys_the_options_leave_alone(pytester, tmp_path):
    matrix = tmp_path / "m.toml"
    matrix.write_text('models = ["gpt2-medium-tiny"]\nranks = [2, 4]\ntargets = ["c_attn"]\nalpha = [16]\nvariants = ["dora"]\n')
    pytester.makepyfile(test_q="def test_q(model_spec, lora_spec):\n    pass\n")
    result = pytester.runpytest("--collect-only", f"--lora-matrix={matrix}", "--lora-ranks=4")
    result.stdout.fnmatch_lines(["*test_q[[]gpt2-medium-tiny-r4-a16-c_attn-dora-d0.05[]]*"])
    assert sum("test_q[" in line for line in result.outlines) == 1


def test_a_suite_table_replaces_keys_for_that_suite_only_and_a_stray_table_is_an_error(pytester, tmp_path):
    """``[serving]`` narrows the serving suite's tests; the params suite keeps the file's keys; a
    table that names no suite (``[servng]``) stops the run before collection (exit 4)."""
    matrix = tmp_path / "m.toml"
    matrix.write_text('models = ["gpt2-medium-tiny"]\nranks = [2, 4]\ntargets = ["c_attn"]\n\n[serving]\nranks = [4]\n')
    pytester.makepyfile(test_q="import pytest\n\n@pytest.mark.lora_serving\ndef test_s(lora_spec):\n    pass\n\n"
                                "@pytest.mark.lora_params\ndef test_p(lora_spec):\n    pass\n")
    result = pytester.runpytest("--collect-only", f"--lora-matrix={matrix}")
    assert sum("test_s[" in line for line in result.outlines) == 1 and sum("test_p[" in line for line in result.outlines) == 2
    result.stdout.fnmatch_lines(["*test_s[[]r4-a8-c_attn-d0.05[]]*"])
    matrix.write_text('ranks = [2]\n\n[servng]\nranks = [4]\n')
    result = pytester.runpytest("--collect-only", f"--lora-matrix={matrix}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*'[[]servng[]]' is neither a matrix key nor a suite's table; allowed: keys: models,*tables: *[[]serving[]]*"])


# --------------------------------------------------------------------------- usage errors

BAD_VALUES = [
    (["--lora-ranks=0"], "--lora-ranks: '0' is not a valid rank; allowed: a positive integer"),
    (["--lora-ranks=-8"], "--lora-ranks: '-8' is not a valid rank; allowed: a positive integer"),
    (["--lora-ranks=eight"], "--lora-ranks: 'eight' is not a rank; allowed: a positive integer"),
    (["--lora-quant=nf5"], "--lora-quant: 'nf5' is not a quantization; allowed: " + ", ".join(QUANTIZATIONS) + "; a grouped format may end in -g<group size>"),
    (["--lora-quant=hqq-4bit-g100"], "--lora-quant: 'hqq-4bit-g100' has a group size hqq does not support; allowed: 8, 16, 32, 64, 128, 256"),
    (["--lora-models=llama-9b"], "--lora-models: 'llama-9b' is neither a registry model nor an existing path; allowed: a registry name (flan-t5-xxl*"),
    (["--lora-models=missing/config.json"], "--lora-models: 'missing/config.json' is neither a registry model nor an existing path*"),
    (["--lora-device=tpu"], "--lora-device: 'tpu' is not a device; allowed: auto, cpu, cuda"),
    (["--lora-history=0"], "--lora-history: '0' is not a number of runs; allowed: an integer >= 1"),  # without --lora-compare too
    (["--lora-targets=q_proj,v_prj"], "--lora-targets: target 'v_prj' matches no Linear, Conv1D or Embedding of llama-3.2-1b-tiny; its modules end in: *"),
    (["--lora-models=gpt2-medium-tiny", "--lora-targets=q_proj"], "--lora-targets: target 'q_proj' matches no Linear, Conv1D or Embedding of gpt2-medium-tiny; its modules end in: c_attn, c_fc, c_proj, lm_head, wpe, wte"),
]


@pytest.mark.parametrize("args, message", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_value_is_a_usage_error(pytester, suite, args, message):
    suite()
    result = pytester.runpytest("--lora-bench", "--lora-models=llama-3.2-1b-tiny", "--lora-quant=none", *args)
    assert_usage_error(pytester, result, message)


def assert_usage_error(pytester, result, message):
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    assert not (pytester.path / "results").exists(), "a usage error must write nothing"


MATRIX_FILES = [
    ("bad.toml", "ranks = [8,\n", "--lora-matrix: '*bad.toml' is not valid TOML (*"),
    ("nowhere.toml", None, "--lora-matrix: '*nowhere.toml' does not exist; allowed: a path to a TOML file"),
    ("m.toml", "ranks = [8]\nrank_dropout = 0.1\n", "--lora-matrix (m.toml): 'rank_dropout' is not a matrix key; allowed: models, quant, ranks, *"),
    ("m.toml", 'dropout = [1.5]\n', "--lora-matrix (m.toml): dropout: 1.5 is not a valid dropout; allowed: a number in [[]0, 1)"),
]


@pytest.mark.parametrize("name, content, message", MATRIX_FILES, ids=["malformed", "missing", "unknown key", "bad value"])
def test_bad_matrix_file(pytester, suite, name, content, message):
    suite()
    if content is not None:
        (pytester.path / name).write_text(content)
    result = pytester.runpytest("--lora-bench", f"--lora-matrix={name}")
    assert_usage_error(pytester, result, message)


def test_bad_environment_value_names_the_variable(pytester, suite, monkeypatch):
    suite()
    monkeypatch.setenv("PYTEST_LORA_QUANT", "int3")
    result = pytester.runpytest("--lora-bench")
    assert_usage_error(pytester, result, "PYTEST_LORA_QUANT (environment): 'int3' is not a quantization; *")


def test_bad_ini_value_names_the_key(pytester, suite):
    suite()
    pytester.makeini("[pytest]\nlora_ranks = 0\n")
    result = pytester.runpytest("--lora-bench")
    assert_usage_error(pytester, result, "lora_ranks (ini): '0' is not a valid rank; *")


def test_bad_boolean_environment_value(pytester, suite, monkeypatch):
    suite()
    monkeypatch.setenv("PYTEST_LORA_BENCH", "maybe")
    result = pytester.runpytest()
    assert_usage_error(pytester, result, "PYTEST_LORA_BENCH: 'maybe' is not a boolean; allowed: *")


def test_cuda_requested_without_a_gpu(pytester, suite):
    suite()
    result = pytester.runpytest("--lora-bench", "--lora-device=cuda")
    assert_usage_error(pytester, result, "--lora-device: 'cuda' but torch sees no CUDA device; allowed here: auto, cpu")


# --------------------------------------------------------------------------- markers and selection


def test_markers_are_registered(pytester):
    result = pytester.runpytest("--markers")
    for marker in ("params", "memory", "step_time", "merge", "forgetting", "lora_matrix"):
        result.stdout.fnmatch_lines([f"@pytest.mark.{marker}*"])


def test_suites_do_not_run_without_bench(pytester, suite):
    suite()
    result = pytester.runpytest("suites", *TINY)
    result.assert_outcomes(skipped=1)
    result.stdout.no_fnmatch_line("*pytest-lora results*")
    assert not (pytester.path / "results").exists()


def test_bench_runs_the_suites_directory_when_no_path_is_given(pytester, suite):
    suite()
    pytester.makepyfile(test_unrelated="def test_unrelated():\n    raise AssertionError('not a suite')\n")
    result = pytester.runpytest("--lora-bench", *TINY)
    result.assert_outcomes(passed=1)
    latest = json.loads((pytester.path / "results" / "latest.json").read_text())
    assert [r["suite"] for r in latest["records"]] == ["params"]


def test_suite_markers_select_suites(pytester, suite):
    suite()
    suite(COUNT_MEMORY, name="test_memory.py")
    result = pytester.runpytest("--lora-bench", "-m", "memory", *TINY)
    result.assert_outcomes(passed=1, deselected=1)
    latest = json.loads((pytester.path / "results" / "latest.json").read_text())
    assert [r["suite"] for r in latest["records"]] == ["memory"]


COUNT_MEMORY = """
import pytest

pytestmark = pytest.mark.lora_memory


def test_weights(base_model, lora_bench):
    lora_bench.record("weight_bytes", sum(p.numel() * p.element_size() for p in base_model.parameters()), "bytes")
"""


def test_lora_matrix_marker_overrides_keys_for_one_test(pytester):
    pytester.makepyfile(
        test_m="""
        import pytest

        @pytest.mark.lora_matrix(quant=["nf4", "int8"], ranks=[2])
        def test_marked(quant_spec, lora_spec):
            pass

        def test_plain(quant_spec, lora_spec):
            pass
        """
    )
    result = pytester.runpytest("--collect-only", *TINY)
    for line in ("*test_marked[[]nf4-r2-a4-q_proj+v_proj-d0.05[]]*", "*test_marked[[]int8-r2-*", "*test_plain[[]none-r8-*"):
        result.stdout.fnmatch_lines([line])  # pytest 8 and 9 order the session-scoped parameters differently



CHECKED = {  # option -> (a value it refuses, values it takes)
    "device": ("tpu", ["auto", "CPU", "cuda"]),
    "rounds": ("0", ["1", "12", None]),
    "warmup": ("-1", ["0", "3"]),
    "threads": ("²", ["1", "4"]),
    "seeds": ("0", ["1", "3"]),
    "history": ("five", ["1", "5"]),
    "report": ("everything", ["summary", "FULL"]),
    "peak": ("inf", ["auto", "measure", "989.5"]),
}


@pytest.mark.parametrize("name", list(CHECKED))
def test_an_option_checks_its_values_where_it_is_declared(name):
    """Each option's own ``check`` says what is wrong with a value and what is allowed; the values
    it takes pass. ``options.resolve`` raises its message as a usage error (the runs above)."""
    from pytest_lora.options import BY_NAME, Setting

    option = BY_NAME[name]
    bad, good = CHECKED[name]
    assert "; allowed: " in option.check(Setting(option, bad, "cli"))
    assert all(option.check(Setting(option, value, "cli")) is None for value in good)


@pytest.mark.parametrize("args, env, ini, expected", [
    ([], None, None, (True, "default")),
    (["--lora-no-confirm"], None, None, (False, "cli")),
    (["--lora-confirm"], "0", None, (True, "cli")),
    ([], "0", None, (False, "env")),
    ([], None, "false", (False, "ini")),
    (["--lora-no-confirm"], None, "true", (False, "cli")),
])
def test_the_confirming_rerun_is_on_by_default_and_each_source_turns_it_off(pytester, monkeypatch, args, env, ini, expected):
    """A gate that is quiet without a flag: ``--lora-confirm`` is on unless the command line
    (``--lora-no-confirm``), the environment or the ini turns it off, with the usual precedence."""
    from pytest_lora import options

    if env is not None:
        monkeypatch.setenv("PYTEST_LORA_CONFIRM", env)
    if ini is not None:
        pytester.makeini(f"[pytest]\nlora_confirm = {ini}\n")
    setting = options.resolve(pytester.parseconfig(*args))["confirm"]
    assert (setting.value, setting.source) == expected
