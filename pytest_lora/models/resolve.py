"""Which model a name means: a registry model, a user's config.json or a local checkpoint.

Import-light (no torch): the matrix resolves every model while pytest parses options.
"""

from __future__ import annotations

from pathlib import Path

from ..specs import MatrixError, ModelSpec
from . import registry


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
    path = Path(name).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    allowed = "a registry name (" + ", ".join(registry.names()) + ") or a path to a config.json or checkpoint directory"
    if not path.exists():
        raise MatrixError(where, name, "is neither a registry model nor an existing path", allowed)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MatrixError(where, name, "is a directory without a config.json", allowed)
        kind = "checkpoint" if registry.has_weights(path) else "config"
        config_file = path if kind == "checkpoint" else path / "config.json"
        return ModelSpec(name, kind, config_file.resolve().as_posix(), _config(path / "config.json", where, name))
    return ModelSpec(name, "config", path.resolve().as_posix(), _config(path, where, name))


def _config(path: Path, where: str, name: str) -> dict:
    try:
        return registry.load_config_dict(path)
    except ValueError as error:
        raise MatrixError(where, name, f"is not a usable config.json ({error})") from None
