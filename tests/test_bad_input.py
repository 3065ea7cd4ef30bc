"""Values and places that once gave a pytest INTERNALERROR with a traceback: each is now a usage
error (exit 4) that names the option or file, the value (shortened when long) and what is
allowed, before anything runs or is written."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

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
    assert_usage_error(pytester, result, f"{where}: '*' is not a * count; allowed: an integer >= *")


def test_a_superscript_gpu_count_and_history(pytester, suite):
    suite()
    assert_usage_error(pytester, pytester.runpytest(*ONE, "--lora-gpus-per-worker=²"),
                       "--lora-gpus-per-worker: '²' is not a GPU count; allowed: an integer >= 1")


def test_a_model_name_too_long_for_the_filesystem(pytester, suite):
    suite()
    result = pytester.runpytest("--lora-bench", "--lora-models=" + "m" * 3000, "--lora-quant=bf16")
    assert_usage_error(pytester, result, "--lora-models: 'mmmm*' (3,002 characters) is not a usable path (File name too long)")
    assert max(len(line) for line in result.stderr.lines) < 300  # the value is shortened


MATRIX_FILES = {  # a matrix file's content: the message (each once an INTERNALERROR or a wrong name)
    "value too long for the filesystem": ('models = ["' + "m" * 3000 + '"]\n',
                                          "models: 'mmmm*' (3,002 characters) is not a usable path (File name too long)*"),
    "empty list": ("alpha = []\n", "alpha: [] is empty; allowed: at least one value"),
    # found by the fuzzer: the error named the default matrix's targets, not the file
    "modules_to_save matching nothing": ('modules_to_save = ["INF"]\n', "modules_to_save: modules_to_save 'INF' matches no module of llama-3.2-1b-tiny"),
}


@pytest.mark.parametrize("case", list(MATRIX_FILES))
def test_a_bad_matrix_file_value_names_the_file_and_key(pytester, suite, case):
    content, message = MATRIX_FILES[case]
    suite()
    (pytester.path / "m.toml").write_text(content)
    result = pytester.runpytest("--lora-bench", "--lora-quant=bf16", "--lora-matrix=m.toml")
    assert_usage_error(pytester, result, f"--lora-matrix (m.toml): {message}")
    assert max(len(line) for line in result.stderr.lines) < 300  # long values are shortened


@pytest.mark.parametrize("option", ["--lora-compare", "--lora-matrix", "--lora-suites", "--lora-forget-data", "--lora-results"])
@pytest.mark.parametrize("value, why", [("a" * 300, "File name too long"), ("~nobody-at-all/x", "Could not determine home directory.")],
                         ids=["too long", "unknown user"])
def test_a_path_option_the_filesystem_refuses(pytester, suite, option, value, why):
    """Found by the fuzzer: --lora-compare with a 300-character name was an INTERNALERROR."""
    suite()
    partner = ["--lora-learn-data=new.txt"] if option == "--lora-forget-data" else []  # the pair comes first
    result = pytester.runpytest(*ONE, f"{option}={value}", *partner)
    assert_usage_error(pytester, result, f"{option}: '{value[:10]}*is not a usable path ({why}); allowed: a path the filesystem accepts")
    assert max(len(line) for line in result.stderr.lines) < 300


def test_shortened_keeps_both_ends_and_the_length():
    assert shortened("short") == "short"
    text = shortened("a" * 50 + "b" * 50, limit=40)
    assert text.startswith("a" * 20) and "..." in text and text.endswith("b" * 10 + " (100 characters)")


# --------------------------------------------------------------------------- the results directory


@pytest.mark.parametrize("path, why", [("taken", "it is a file, not a directory"), ("taken/results", "Not a directory")],
                         ids=["a file", "under a file"])
def test_a_results_path_that_is_or_lies_under_a_file(pytester, suite, path, why):
    suite()
    (pytester.path / "taken").write_text("not a directory")
    result = pytester.runpytest(*ONE, f"--lora-results={path}")
    assert_usage_error(pytester, result, f"--lora-results: '*{path}'* cannot hold the results ({why}); allowed: *")  # a long path is shortened


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC], ids=["read-only", "disk full"])
def test_an_unwritable_results_directory(pytester, suite, monkeypatch, code):
    """A read-only filesystem, or a full disk, refuses the probe file (root ignores permission
    bits, so the filesystem's refusal is planted)."""
    suite()
    real = tempfile.mkstemp

    def refused(*args, **kwargs):
        if str(kwargs.get("prefix", "")).startswith(".pytest-lora-probe"):
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    result = pytester.runpytest(*ONE, "--lora-results=out")
    assert_usage_error(pytester, result, f"--lora-results: '*out'* cannot hold the results ({os.strerror(code)}); allowed: *")  # a long path is shortened
    assert not (pytester.path / "out").exists()  # the directory made for the check is gone again


def test_a_usable_results_directory_is_left_as_it_was(pytester, suite, monkeypatch):
    """The check made ``deep/out`` and wrote its probe there (it ran, on that path), and took
    both away again: a run that writes nothing leaves no directory behind."""
    from pytest_lora.results import store

    probes, real = [], store.tempfile.mkstemp

    def probe(*args, prefix=None, dir=None, **kwargs):
        if prefix == ".pytest-lora-probe.":
            probes.append((Path(dir), Path(dir).is_dir()))
        return real(*args, prefix=prefix, dir=dir, **kwargs)

    monkeypatch.setattr(store.tempfile, "mkstemp", probe)
    suite()
    result = pytester.runpytest(*ONE, "--lora-results=deep/out", "--co")
    assert result.ret == 0 and probes == [(pytester.path / "deep" / "out", True)]
    assert not (pytester.path / "deep").exists()


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


# --------------------------------------------------------------------------- a results write that fails mid-run

EIGHT_RECORDS = """
import pytest


@pytest.mark.parametrize("n", range(8))
def test_record(lora_bench, n):
    lora_bench.record("n", n, "things")
"""

DISK_FULL = """
import errno, os
from pytest_lora.results import runlog

real = runlog.RunLog.append
FULL_AT = int(os.environ["PLANTED_FULL_AT"])  # the record whose append finds the disk full
appended = []


def full(self, header, records):
    if len(appended) + len(records) >= FULL_AT:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real(self, header, records)
    appended.extend(records)
    with open(os.environ["PLANTED_APPENDED"], "w") as count:  # what the log holds, for the test to check
        count.write(str(len(appended)))


runlog.RunLog.append = full
"""


def plant_full_disk(monkeypatch, full_at: int, temp_full: bool) -> None:
    """The results directory's disk is full from record ``full_at`` on; with ``temp_full``, the
    temporary directory's too (a fake filesystem error at the store, undone after the test)."""
    from pytest_lora.results import runlog, store

    real_append, real_write = runlog.RunLog.append, store.atomic_write_text
    appended = []

    def full_append(self, header, records):
        if len(appended) + len(records) >= full_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_append(self, header, records)
        appended.extend(records)

    def full_write(path, text):  # the recovery file's write
        if temp_full and path.parent.name != "results":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, text)

    monkeypatch.setattr(runlog.RunLog, "append", full_append)
    monkeypatch.setattr(store, "atomic_write_text", full_write)


def run_with_full_disk(pytester, suite, monkeypatch, temp_full: bool = False):
    suite(EIGHT_RECORDS)
    plant_full_disk(monkeypatch, 6, temp_full)
    monkeypatch.setattr(tempfile, "tempdir", str(pytester.path / "tmp"))
    (pytester.path / "tmp").mkdir()
    return pytester.runpytest("--lora-bench", "--lora-results=results")


def test_a_disk_full_after_the_fifth_record_keeps_all_and_says_where(pytester, suite, monkeypatch):
    """The sixth record's append fails: the run stops there (exit 2, interrupted), the run's log
    holds the five written before, and the recovery file in the temporary directory holds all
    six, with the run's status; the error names both."""
    from pytest_lora.results.store import load

    result = run_with_full_disk(pytester, suite, monkeypatch)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=6)  # the run stopped after the test whose write failed
    (log,) = (pytester.path / "results").glob("*.jsonl")
    assert not list((pytester.path / "results").glob("*.json"))  # the document is written at the end, into the recovery file
    (recovery,) = (pytester.path / "tmp").glob("pytest-lora-*.json")
    result.stdout.fnmatch_lines([
        "pytest-lora: the results were not all written: cannot append to*",
        f"*Interrupted: --lora-results: cannot append to {log.name} in {log.parent} (No space left on device): "
        f"{log.name} holds the first 5 of the 6 records (its complete lines); all 6 are in {recovery} *",
    ])
    written = load(log)
    assert [record["test"] for record in written["records"]] == [f"suites/test_suite.py::test_record[{n}]" for n in range(5)]
    assert written["run"]["status"] == "running"  # as the disk last saw it
    recovered = load(recovery)
    assert [record["test"] for record in recovered["records"]] == [f"suites/test_suite.py::test_record[{n}]" for n in range(6)]
    assert recovered["run"]["status"] == "interrupted" and "No space left" in recovered["run"]["stopped_by"]
    assert not list((pytester.path / "results").glob(".*.tmp"))  # no temporary file left behind


def test_when_the_temporary_directory_is_full_too_the_unsaved_record_is_printed(pytester, suite, monkeypatch):
    import json

    result = run_with_full_disk(pytester, suite, monkeypatch, temp_full=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*the recovery file *pytest-lora-*.json could not be written either (No space left on device): "
                                 "the 1 record(s) on no disk are printed below, a JSON line each"])
    printed = [json.loads(line) for line in result.stdout.lines if line.startswith("{")]
    assert [record["test"] for record in printed] == ["suites/test_suite.py::test_record[5]"]
    assert printed[0]["metrics"] == {"n": 5}


@pytest.mark.slow
def test_under_xdist_the_controller_stops_its_workers_and_keeps_the_records(pytester, suite, monkeypatch):
    """The controller writes the run's file: a write failing there stops the workers (xdist's
    own stop, as for ``-x``); the records are in the recovery file, and nothing is lost that
    the controller had received."""
    from pytest_lora.results.store import load

    suite(EIGHT_RECORDS.replace("range(8)", "range(40)"))
    pytester.makepyfile(planted_full_disk=DISK_FULL)
    monkeypatch.setenv("PYTHONPATH", f"{pytester.path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("PLANTED_FULL_AT", "6")
    monkeypatch.setenv("PLANTED_APPENDED", str(pytester.path / "appended"))
    monkeypatch.setenv("TMPDIR", str(pytester.path / "tmp"))
    (pytester.path / "tmp").mkdir()
    result = pytester.runpytest_subprocess("--lora-bench", "suites", "--lora-results=results", "-p", "planted_full_disk",
                                           "-n", "2", "-p", "no:cacheprovider", "-k", "test_record")
    assert result.ret == pytest.ExitCode.INTERRUPTED, result.stdout.str()
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    (recovery,) = (pytester.path / "tmp").glob("pytest-lora-*.json")
    recovered = load(recovery)
    assert recovered["run"]["status"] == "interrupted"
    (log,) = (pytester.path / "results").glob("*.jsonl")
    logged = load(log)["records"]
    # records arrive from the workers in batches: the log holds those appended before the batch
    # that found the disk full, which went, with them, to the recovery file
    appended = pytester.path / "appended"  # written after each append that went through
    assert len(logged) == (int(appended.read_text()) if appended.exists() else 0) < 6
    assert {r["test"] for r in logged} < {r["test"] for r in recovered["records"]} and len(recovered["records"]) >= 6
    # nothing lost: every record the workers journaled (their journals stay when the run's write failed) is recovered
    journaled = {json.loads(line)["record"]["test"] for path in (pytester.path / "results").glob("*.workers/*.jsonl")
                 for line in path.read_text().splitlines() if json.loads(line).get("event") == "record"}
    assert journaled and journaled == {r["test"] for r in recovered["records"]}


JOURNAL_FULL = """
import errno, os
from pytest_lora.dist import journal

real = journal.Journal._write
written = []


def full(self, line):
    if self._target == self.path and b'"event":"record"' in line:
        written.append(line)
        if len(written) >= 3:  # this worker's third record finds the disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(self, line)


journal.Journal._write = full
"""


@pytest.mark.slow
def test_a_worker_whose_journal_fails_carries_on_in_a_recovery_journal_and_stops_the_run(pytester, suite, monkeypatch):
    """A worker's third record finds its journal's disk full: it goes to the recovery journal,
    which the controller reads too, so the run's file holds every record measured, each ``ok``;
    the run stops (exit 2) with the worker's reason, and the recovery journal is removed once the
    run's file holds it."""
    from pytest_lora.results.store import load

    suite(EIGHT_RECORDS.replace("range(8)", "range(40)"))
    pytester.makepyfile(planted_full_journal=JOURNAL_FULL)
    monkeypatch.setenv("PYTHONPATH", f"{pytester.path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("TMPDIR", str(pytester.path / "tmp"))
    (pytester.path / "tmp").mkdir()
    result = pytester.runpytest_subprocess("--lora-bench", "suites", "--lora-results=results", "-p", "planted_full_journal",
                                           "-n", "2", "-p", "no:cacheprovider", "-k", "test_record", "-rA")
    assert result.ret == pytest.ExitCode.INTERRUPTED, result.stdout.str()
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines([f"*Interrupted: gw?: cannot append to *gw?.jsonl (No space left on device): "
                                 f"this worker's events from then on are in *{os.sep}tmp{os.sep}pytest-lora-*-gw?.jsonl*"])
    passed = {line.split()[1] for line in result.stdout.lines if line.startswith("PASSED ")}
    (run_file,) = (path for path in (pytester.path / "results").glob("*.json") if path.name != "latest.json")
    document = load(run_file)
    assert {record["test"] for record in document["records"]} == passed and len(passed) < 40  # the run stopped early
    assert {record["status"] for record in document["records"]} == {"ok"}
    assert document["run"]["status"] == "interrupted" and "cannot append to" in document["run"]["stopped_by"]
    assert not list((pytester.path / "tmp").glob("pytest-lora-*.jsonl"))


def test_a_journal_fails_over_once_then_gives_up_saying_so(tmp_path, monkeypatch):
    """Unit: the journal's failure paths, each told to the session once as it happens."""
    from pytest_lora.dist import journal

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    told = []
    entry = journal.Journal(tmp_path / "run.workers" / "gw0.jsonl", on_failure=told.append)
    entry.dropped("a")
    (tmp_path / "run.workers" / "gw0.jsonl").unlink()
    (tmp_path / "run.workers").rmdir()
    (tmp_path / "run.workers").write_text("")  # the journal's directory becomes a file: appends fail
    entry.close()
    entry.dropped("b")
    assert told == [f"cannot append to {tmp_path / 'run.workers' / 'gw0.jsonl'} (File exists): this worker's events "
                    f"from then on are in {tmp_path / 'tmp' / 'pytest-lora-run-gw0.jsonl'}"]
    assert (tmp_path / "tmp" / "pytest-lora-run-gw0.jsonl").read_text() == '{"event":"dropped","nodeid":"b"}\n'
    (tmp_path / "tmp" / "pytest-lora-run-gw0.jsonl").unlink()
    (tmp_path / "tmp").rmdir()
    (tmp_path / "tmp").write_text("")  # and then the temporary directory
    entry.close()
    entry.dropped("c")
    entry.dropped("d")  # nothing more is tried, or told
    assert len(told) == 2 and told[1].endswith("then that failed too (File exists): this worker's later records are lost")


def test_a_journal_whose_recovery_fails_at_once_says_both(tmp_path, monkeypatch):
    from pytest_lora.dist import journal

    (tmp_path / "tmp").write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "run.workers").write_text("")
    told = []
    journal.Journal(tmp_path / "run.workers" / "gw1.jsonl", on_failure=told.append).dropped("a")
    assert len(told) == 1 and "(File exists), nor to" in told[0] and told[0].endswith("this worker's later records are lost")


def test_a_results_directory_removed_mid_run_is_made_again_with_every_record(pytester, suite):
    """Each write holds the whole run, so a directory removed between records (a cleanup job)
    comes back with all of them."""
    from pytest_lora.results.store import load

    suite(EIGHT_RECORDS.replace('lora_bench.record("n", n, "things")',
                                'lora_bench.record("n", n, "things")\n    if n == 3:\n        import shutil\n        shutil.rmtree("results")'))
    result = pytester.runpytest("--lora-bench", "--lora-results=results")
    assert result.ret == 0
    assert len(load(pytester.path / "results" / "latest.json")["records"]) == 8


def test_a_report_that_cannot_be_written_fails_the_run_and_keeps_the_json(pytester, suite, monkeypatch):
    from pytest_lora.results.store import load

    import importlib

    publish = importlib.import_module("pytest_lora.report.publish")  # what the store imports, though an earlier run dropped it

    def refused(*args, **kwargs):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    suite(EIGHT_RECORDS)
    monkeypatch.setattr(publish, "write_report", refused)
    result = pytester.runpytest("--lora-bench", "--lora-results=results")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["pytest-lora: the results were not all written: the report beside *.json could not be written "
                                 "(Disk quota exceeded); the JSON holds every record"])
    document = load(pytester.path / "results" / "latest.json")
    assert len(document["records"]) == 8 and document["run"]["status"] == "passed"


# --------------------------------------------------------------------------- values that used to fall back silently

@pytest.mark.parametrize("arg", ["--lora-quant=", "--lora-targets= ", "--lora-fail="])
def test_an_explicitly_empty_option_is_a_usage_error(pytester, suite, arg):
    suite()
    name = arg.split("=")[0]
    assert_usage_error(pytester, pytester.runpytest(*ONE[:2], arg), f"{name}: an empty value; allowed: * (leave the option out for its default)")


def test_a_blank_environment_value_is_a_usage_error_and_an_empty_one_is_unset(pytester, suite, monkeypatch):
    suite()
    monkeypatch.setenv("PYTEST_LORA_QUANT", " \t")
    assert_usage_error(pytester, pytester.runpytest(*ONE[:2]), "PYTEST_LORA_QUANT (environment): ' \\t' is blank; allowed: Q,..., or unset or ''")
    monkeypatch.setenv("PYTEST_LORA_QUANT", "")  # as a CI template leaves a variable it has no value for
    result = pytester.runpytest(*ONE, "--co")
    assert result.ret == 0


@pytest.mark.parametrize("peak", ["inf", "1e400", "nan", "-inf"])
def test_a_peak_that_is_not_finite_is_a_usage_error(pytester, suite, peak):
    suite()
    assert_usage_error(pytester, pytester.runpytest(*ONE, f"--lora-peak={peak}"),
                       f"--lora-peak: '{peak}' is not a peak; allowed: auto, measure or TFLOP/s as a finite positive number")


# --------------------------------------------------------------------------- the forgetting experiment's data files

DATA_FILES = {  # name: (content, what read_texts says)
    "binary.txt": (b"\x89PNG\r\n\x1a\n\xff\x00", "is not UTF-8 text (byte 0: invalid start byte; a binary file?)"),
    "empty.txt": (b"\n\n  \n", "holds no text"),
    "broken.jsonl": (b'{"text": "w1 w2"}\n{"text": \n', "line 2 is not JSON (Expecting value)"),
    "untexted.jsonl": (b'{"text": "w1"}\n\n{"content": "w2"}\n', 'line 3 has no "text" string (*)'),
    "listed.jsonl": (b'["w1"]\n', 'line 1 has no "text" string (*)'),
}


@pytest.mark.parametrize("name", list(DATA_FILES))
def test_data_files_the_experiment_cannot_read_say_why(tmp_path, name):
    import fnmatch

    from pytest_lora.measure import forgetting

    content, reason = DATA_FILES[name]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(forgetting.DataProblem) as raised:
        forgetting.read_texts(tmp_path / name)
    assert fnmatch.fnmatch(str(raised.value), reason), str(raised.value)


@pytest.fixture(scope="module")
def word_checkpoint(tmp_path_factory):
    """A tiny Llama with a word-level tokenizer: ``wN`` is one token."""
    from test_forgetting_checks import save_checkpoint_with_tokenizer

    directory = tmp_path_factory.mktemp("checkpoint") / "my-model"
    save_checkpoint_with_tokenizer(directory)
    return directory


def words(count: int) -> str:
    return " ".join(f"w{i % 200}" for i in range(count))


@pytest.mark.parametrize("forget, learn, message", [
    (words(64), words(100), "--lora-learn-data: 'new.txt' 100 tokens: too few for 2 blocks of 64; allowed: UTF-8 text or JSONL with a "
                            '"text" field, at least 2 blocks (one held out, one to train on) of 64 tokens'),
    (words(63), words(200), "--lora-forget-data: 'old.txt' 63 tokens: too few for one block of 64; allowed: *at least one block of 64 tokens"),
    ("", words(200), "--lora-forget-data: 'old.txt' holds no text; allowed: *"),
], ids=["one learn block", "short forget file", "empty forget file"])
def test_data_files_are_checked_before_the_run(pytester, word_checkpoint, forget, learn, message):
    """A learn file of one block would make the held-out set the training set: refused, as are
    a forget file too short for one block and an empty one, before any test runs."""
    (pytester.path / "old.txt").write_text(forget)
    (pytester.path / "new.txt").write_text(learn)
    result = pytester.runpytest("--lora-bench", f"--lora-models={word_checkpoint}", "--lora-quant=fp32", "--lora-forget-data=old.txt",
                                "--lora-learn-data=new.txt", "-m", "lora_forgetting")
    assert_usage_error(pytester, result, message)
