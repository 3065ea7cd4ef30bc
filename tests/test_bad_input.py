"""Values and places that once gave a pytest INTERNALERROR with a traceback: each is now a usage
error (exit 4) that names the option or file, the value (shortened when long) and what is
allowed, before anything runs or is written."""

from __future__ import annotations

import errno
import os
import tempfile

import pytest
from test_options import assert_usage_error

from pytest_lora.specs import shortened, whole_number

ONE = ("--lora-bench", "--lora-models=llama-3.2-1b-tiny", "--lora-quant=bf16")


def test_whole_numbers_are_ascii_digits():
    assert whole_number("12") == 12 and whole_number(" 3 ") == 3 and whole_number(7) == 7
    for text in ("²", "¹", "-1", "1.5", "", "1e3", "٣"):  # str.isdigit accepts the superscripts
        assert whole_number(text) is None, text


@pytest.mark.parametrize("source", ["cli", "env", "ini"])
def test_a_superscript_digit_is_a_usage_error_from_every_source(pytester, suite, monkeypatch, source):
    suite()
    args = list(ONE)
    if source == "cli":
        args.append("--lora-rounds=²")
        where = "--lora-rounds"
    elif source == "env":
        monkeypatch.setenv("PYTEST_LORA_SEEDS", "¹")
        where = "PYTEST_LORA_SEEDS (environment)"
    else:
        pytester.makeini("[pytest]\nlora_rounds = ²\n")
        where = "lora_rounds (ini)"
    result = pytester.runpytest(*args)
    assert_usage_error(pytester, result, f"{where}: '*' is not a step count; allowed: an integer >= *")


def test_a_superscript_gpu_count_and_history(pytester, suite):
    suite()
    assert_usage_error(pytester, pytester.runpytest(*ONE, "--lora-gpus-per-worker=²"),
                       "--lora-gpus-per-worker: '²' is not a GPU count; allowed: an integer >= 1")


def test_a_model_name_too_long_for_the_filesystem(pytester, suite):
    suite()
    result = pytester.runpytest("--lora-bench", "--lora-models=" + "m" * 3000, "--lora-quant=bf16")
    assert_usage_error(pytester, result, "--lora-models: 'mmmm*' (3,002 characters) is not a usable path (File name too long)")
    assert max(len(line) for line in result.stderr.lines) < 300  # the value is shortened


def test_an_empty_list_in_a_matrix_file(pytester, suite):
    suite()
    (pytester.path / "m.toml").write_text("alpha = []\n")
    result = pytester.runpytest(*ONE, "--lora-matrix=m.toml")
    assert_usage_error(pytester, result, "--lora-matrix (m.toml): alpha: [] is empty; allowed: at least one value")


def test_shortened_keeps_both_ends_and_the_length():
    assert shortened("short") == "short"
    text = shortened("a" * 50 + "b" * 50, limit=40)
    assert text.startswith("a" * 20) and "..." in text and text.endswith("b" * 10 + " (100 characters)")


# --------------------------------------------------------------------------- the results directory


def test_a_results_path_that_is_a_file(pytester, suite):
    suite()
    (pytester.path / "taken").write_text("not a directory")
    result = pytester.runpytest(*ONE, "--lora-results=taken")
    assert_usage_error(pytester, result, "--lora-results: '*taken' cannot hold the results (it is a file, not a directory); allowed: *")


def test_a_results_path_under_a_file(pytester, suite):
    suite()
    (pytester.path / "taken").write_text("not a directory")
    result = pytester.runpytest(*ONE, "--lora-results=taken/results")
    assert_usage_error(pytester, result, "--lora-results: '*taken/results' cannot hold the results (Not a directory); allowed: *")


def test_an_unwritable_results_directory(pytester, suite, monkeypatch):
    """A read-only filesystem refuses the probe file (root ignores permission bits, so the
    filesystem's refusal is planted)."""
    suite()
    real = tempfile.mkstemp

    def read_only(*args, **kwargs):
        if str(kwargs.get("prefix", "")).startswith(".pytest-lora-probe"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    result = pytester.runpytest(*ONE, "--lora-results=out")
    assert_usage_error(pytester, result, "--lora-results: '*out' cannot hold the results (Read-only file system); allowed: *")
    assert not (pytester.path / "out").exists()  # the directory made for the check is gone again


def test_a_usable_results_directory_is_left_as_it_was(pytester, suite):
    suite()
    result = pytester.runpytest(*ONE, "--lora-results=deep/out", "--co")
    assert result.ret == 0 and not (pytester.path / "deep").exists()


# --------------------------------------------------------------------------- a model's config.json

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
         "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 1, "vocab_size": 128, "max_position_embeddings": 64}
REFUSED = {  # by transformers: its reason follows the file
    "heads": ({"hidden_size": 100, "num_attention_heads": 3},
              "transformers refuses this config.json (*hidden size (100) is not a multiple of the number of attention heads (3)*)"),
    "unknown type": ({"model_type": "llamaa"}, "transformers refuses this config.json (*llamaa*)"),
    # by our size checks, before transformers (which would let the first two through to torch's "negative dimension")
    "negative hidden size": ({"hidden_size": -64}, "hidden_size: -64 is not a size; allowed: a whole number >= 1"),
    "no layers": ({"num_hidden_layers": 0}, "num_hidden_layers: 0 is not a size; allowed: a whole number >= 1"),
    "string layers": ({"num_hidden_layers": "2"}, 'num_hidden_layers: "2" is not a size; allowed: a whole number >= 1'),
    "two fields": ({"vocab_size": 1.5, "num_attention_heads": True},
                   "num_attention_heads: true is not a size; vocab_size: 1.5 is not a size; allowed: *"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_config_json_refused_names_file_and_field(pytester, suite, name):
    import json

    change, reason = REFUSED[name]
    (pytester.path / "m").mkdir()
    (pytester.path / "m" / "config.json").write_text(json.dumps({**LLAMA, **change}))
    suite()
    result = pytester.runpytest("--lora-bench", "--lora-models=m/config.json", "--lora-quant=bf16")
    assert_usage_error(pytester, result, "--lora-models: *m/config.json: " + reason)
    assert max(len(line) for line in result.stderr.lines) < 500
