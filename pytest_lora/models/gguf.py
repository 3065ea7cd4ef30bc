"""GGUF files as checkpoints: what people who run llama.cpp or Ollama already have on disk.

transformers reads a ``.gguf`` file (``from_pretrained(directory, gguf_file=name)``) and
dequantizes every tensor, but a model it loaded that way refuses ``save_pretrained`` ("quantized
with gguf and is not serializable") and takes seconds to load (12 s for SmolLM2-135M here). So a
file is converted once: its tensors, dequantized by transformers' own GGUF loader, are put into a
fresh model of the architecture the file names, saved with its tokenizer as a safetensors
checkpoint under the user's cache directory, keyed by the file's SHA-256. Every later run, and
every xdist worker, loads that checkpoint as any other.

The file is checked before anything runs (``MatrixError``, exit 4): readable GGUF, an
architecture transformers can read. Import-light until a conversion is needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ..specs import MatrixError

SUFFIX = ".gguf"
INSTALL = "pip install gguf (or pytest-lora[gguf])"
DONE = "converted.json"  # written last: a directory without it is an interrupted conversion


def cache_root() -> Path:
    """Where pytest-lora keeps what it made once: ``$PYTEST_LORA_CACHE``, else the XDG cache."""
    if os.environ.get("PYTEST_LORA_CACHE"):
        return Path(os.environ["PYTEST_LORA_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "pytest-lora"


def file_in(directory: Path) -> Path | None:
    """The one ``.gguf`` file of a directory that has no config.json, or ``None``."""
    found = sorted(directory.glob(f"*{SUFFIX}"))
    return found[0] if len(found) == 1 else None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_of(path: Path, where: str, name: str) -> Path:
    """The converted checkpoint of a GGUF file: from the cache, or converted now."""
    check(path, where, name)
    target = cache_root() / "gguf" / f"{path.stem}-{sha256(path)[:16]}"
    if not (target / DONE).is_file():
        convert(path, target, where, name)
    return target


def check(path: Path, where: str, name: str) -> None:
    """A readable GGUF file of an architecture transformers' loader supports, or a ``MatrixError``
    that names the file and what is supported."""
    try:
        import gguf
    except ImportError:
        raise MatrixError(where, name, f"is a GGUF file, and reading one needs the gguf package: {INSTALL}") from None
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
    except Exception as error:  # noqa: BLE001 - whatever the reader trips over in a damaged file, the file is unreadable
        raise MatrixError(where, name, f"is not a readable GGUF file ({type(error).__name__}: {error})",
                          "a GGUF file as llama.cpp writes it (magic 'GGUF', version 2 or 3)") from None
    supported = supported_architectures()
    if architecture not in supported:
        raise MatrixError(where, name, f"is a GGUF file of architecture {architecture!r}, which transformers' GGUF loader can't read",
                          "GGUF architectures " + ", ".join(supported))


def supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [name for name in GGUF_SUPPORTED_ARCHITECTURES if name not in ("general", "tokenizer")]  # those two are sections


def convert(path: Path, target: Path, where: str, name: str) -> None:  # the real one is converted in tests/test_real_model.py
    """Dequantize ``path`` into a float32 safetensors checkpoint at ``target`` (atomically: a
    temporary directory renamed into place; a concurrent conversion of the same file loses the
    race harmlessly). float32 holds every GGUF block format's values exactly (a fp16 scale times
    a small integer, plus a fp16 offset)."""
    import torch
    import transformers

    target.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.write(f"pytest-lora: converting {path.name} once (dequantized to float32), into {target}\n")
    try:
        with _no_progress_bars():
            loaded = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError, OSError) as error:
        raise MatrixError(where, name, f"could not be read by transformers' GGUF loader ({type(error).__name__}: {error})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):  # transformers marks the loaded model gguf-quantized
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    fresh = type(loaded)(config)  # a model transformers can save: the loaded one is marked gguf-quantized
    fresh.load_state_dict(loaded.state_dict())
    work = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        with _no_progress_bars():
            fresh.save_pretrained(work)
        _save_tokenizer(path, work)
        (work / DONE).write_text(json.dumps({"gguf": str(path), "sha256": sha256(path), "parameters": sum(p.numel() for p in fresh.parameters())}))
        try:
            work.rename(target)
        except OSError:  # another process converted it first
            if not (target / DONE).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' bars, off for one conversion (the line above says what happens): its GGUF
    reader calls ``tqdm.auto.tqdm`` itself, which transformers' progress-bar switch doesn't reach."""
    import transformers
    from transformers import modeling_gguf_pytorch_utils as reader

    bars, reader_bar = transformers.utils.logging.is_progress_bar_enabled(), getattr(reader, "tqdm", None)
    transformers.utils.logging.disable_progress_bar()
    if reader_bar is not None:  # a transformers whose reader has no bar of its own has nothing to switch off
        reader.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        if reader_bar is not None:
            reader.tqdm = reader_bar
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _save_tokenizer(path: Path, directory: Path) -> None:
    """The file's own tokenizer beside the weights, where the file has one transformers reads."""
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError, TypeError, AttributeError):
        return  # a GGUF without tokenizer metadata: weights only
    tokenizer.save_pretrained(directory)


def converted_info(checkpoint: Path) -> dict[str, Any]:
    """What a conversion recorded: the GGUF file, its SHA-256, the parameter count."""
    return json.loads((checkpoint / DONE).read_text(encoding="utf-8"))
