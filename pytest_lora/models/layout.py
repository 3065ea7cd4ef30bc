"""A model's layout: its tensors and the layers LoRA can adapt, as plain numbers.

The analytic step (``measure.step``) needs of an architecture only shapes: each parameter's and
buffer's elements and dtype, and each adaptable layer's sides and what a quantized base or
peft's ``all-linear`` makes of it. Reading them off the model built on the meta device costs
seconds, nearly all of it importing torch and transformers; a ``Layout`` holds them without
torch, so ``pytest-lora estimate`` answers in well under a second:

* the registry's models ship theirs (``layouts/<name>.json``, written by ``make layouts``;
  ``tests/test_layout.py`` checks each against the model built by the installed transformers);
* any other model's is built once (``built``) and kept in the cache of ``models.gguf``, keyed by
  its config, the libraries that decide its modules and the source that reads them (``of``).

This module imports neither torch nor transformers; ``built`` imports them when it runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..specs import QuantSpec
from . import storage
from .layers import name_matches, rank_of

FOLLOWS_BUILD = 0
"""A tensor's bytes an element when it is stored in the dtype the base is built in."""

SHIPPED = Path(__file__).parent / "layouts"
UNMODELLED = ("layers_to_transform", "exclude_modules", "target_parameters", "alpha_pattern")
"""LoraConfig options the layout's counts do not model (an estimate refuses them, ``Unmodelled``)."""


class Unmodelled(NotImplementedError):
    """The LoRA config uses an option the closed form does not model."""


@dataclass(frozen=True)
class Layer:
    """A module peft can put LoRA on by name (a Linear, GPT-2's Conv1D or an Embedding):
    its sides (LoRA's A is r x ``fan_in``), whether it is linear, whether ``all-linear`` adapts
    it, whether a quantized base stores its weight quantized, and its bias's elements."""

    name: str
    fan_in: int
    fan_out: int
    linear: bool
    all_linear: bool
    quantized: bool
    bias: int


@dataclass(frozen=True)
class Layout:
    """The tensors and adaptable layers of one architecture.

    ``parameters``: (name, elements, bytes an element or ``FOLLOWS_BUILD``) of each parameter,
    a tied one once, under the name the model gives it first; ``aliases``: every other name of a
    tied parameter -> that first name; ``buffers`` as ``parameters``; ``default_targets``: peft's
    target modules for the ``model_type`` (``None``: peft has none).
    """

    model_type: str
    parameters: tuple[tuple[str, int, int], ...]
    aliases: tuple[tuple[str, str], ...]
    buffers: tuple[tuple[str, int, int], ...]
    layers: tuple[Layer, ...]
    default_targets: tuple[str, ...] | None

    # ----------------------------------------------------------------- weights

    def weight_bytes(self, quant: QuantSpec, element_bytes: int, tensor_bytes: Callable[[int, int, QuantSpec], int] = storage.quantized_bytes) -> int:
        """Bytes of the base stored as ``quant`` when built in a dtype of ``element_bytes``: each
        weight that the format quantizes at what ``tensor_bytes`` (rows, columns, quant) says
        (the memory suite asks the format itself, ``Format.tensor_bytes``; the estimate the same
        arithmetic without torch, ``storage.quantized_bytes``), every other parameter and buffer
        in its dtype."""
        quantized = {f"{layer.name}.weight": layer for layer in self.layers if layer.quantized} if quant.is_quantized else {}
        total = 0
        for name, elements, size in self.parameters + self.buffers:
            layer = quantized.get(name)
            if layer is not None:
                total += tensor_bytes(layer.fan_out, layer.fan_in, quant)
            else:
                total += elements * (size or element_bytes)
        return total

    # ----------------------------------------------------------------- the adapter

    def adapted(self, lora: Any) -> dict[str, tuple[int, int]]:
        """Name -> (fan_in, fan_out) of every layer a LoRA config adapts, by peft's rules: a list
        of names matches a layer's full name or its last dotted parts, a string is a regular
        expression over the full name, ``all-linear`` is every linear layer but the output layer,
        ``None`` is peft's default list for the architecture."""
        refuse_unmodelled(lora)
        targets = lora.target_modules
        if targets is None:
            if self.default_targets is None:
                raise Unmodelled(f"peft has no default LoRA targets for model_type {self.model_type!r}")
            targets = list(self.default_targets)
        if targets == "all-linear":
            return {layer.name: (layer.fan_in, layer.fan_out) for layer in self.layers if layer.all_linear}
        return {layer.name: (layer.fan_in, layer.fan_out) for layer in self.layers if name_matches(layer.name, targets)}

    def trainable_sizes(self, lora: Any) -> list[int]:
        """The elements of each trainable tensor the LoRA config creates or unfreezes: A (r x
        fan_in), B (fan_out x r) and DoRA's magnitude (fan_out) per adapted layer, the biases it
        trains (``bias="all"``: every parameter named ``bias``; ``"lora_only"``: the adapted
        layers'), each parameter of the modules it saves whole. An 8-bit optimizer quantizes each
        tensor on its own, so its state depends on these sizes, not only on their sum."""
        adapted = self.adapted(lora)
        sizes = []
        for name, (fan_in, fan_out) in adapted.items():
            r = rank_of(name, lora)
            sizes += [r * fan_in, fan_out * r] + ([fan_out] if lora.use_dora else [])
        if lora.bias == "all":
            sizes += [elements for name, elements, _ in self.parameters if name == "bias" or name.endswith(".bias")]
        elif lora.bias == "lora_only":
            sizes += [layer.bias for layer in self.layers if layer.name in adapted and layer.bias]
        return sizes + self._saved_sizes(set(lora.modules_to_save or ()))

    def _saved_sizes(self, names: set[str]) -> list[int]:
        """The parameters of every module ``modules_to_save`` names, each module's own once."""
        if not names:
            return []
        elements = {name: count for name, count, _ in self.parameters}
        owners = [(name, name) for name in elements] + list(self.aliases)  # (a name of the parameter, its first name)
        modules = sorted({name.rsplit(".", depth)[0] for name, _ in owners for depth in range(1, name.count(".") + 1)})
        sizes = []
        for module in (module for module in modules if name_matches(module, names)):
            inside = dict.fromkeys(first for name, first in owners if name.startswith(module + "."))
            sizes += [elements[first] for first in inside]
        return sizes

    # ----------------------------------------------------------------- JSON

    def as_json(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "parameters": [list(p) for p in self.parameters], "aliases": [list(a) for a in self.aliases],
                "buffers": [list(b) for b in self.buffers], "layers": [list(vars(layer).values()) for layer in self.layers],
                "default_targets": None if self.default_targets is None else list(self.default_targets)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Layout:
        defaults = data["default_targets"]
        return cls(data["model_type"], tuple((str(n), int(e), int(b)) for n, e, b in data["parameters"]),
                   tuple((str(a), str(f)) for a, f in data["aliases"]), tuple((str(n), int(e), int(b)) for n, e, b in data["buffers"]),
                   tuple(Layer(*layer) for layer in data["layers"]), None if defaults is None else tuple(defaults))


def refuse_unmodelled(lora: Any) -> None:
    for option in UNMODELLED:
        if getattr(lora, option, None):
            raise Unmodelled(f"the closed form does not model LoraConfig.{option}")


# --------------------------------------------------------------------------- where a layout comes from


def of(config_dict: dict[str, Any], name: str | None = None) -> Layout:
    """The layout of a config: the registry's shipped one for ``name`` when it is of this very
    config, else the cache's, else built on the meta device (seconds) and cached."""
    shipped = _shipped(name, config_dict) if name else None
    if shipped is not None:
        return shipped
    path = _cache_path(config_dict)
    stored = _read_json(path)
    if stored is not None:
        return Layout.from_json(stored)
    found = built(config_dict)
    _write_json(path, found.as_json())
    return found


def config_digest(config_dict: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config_dict, sort_keys=True).encode()).hexdigest()


def _shipped(name: str, config_dict: dict[str, Any]) -> Layout | None:
    stored = _read_json(SHIPPED / f"{name}.json")
    if stored is None or stored.get("config") != config_digest(config_dict):
        return None
    return Layout.from_json(stored["layout"])


def built(config_dict: dict[str, Any]) -> Layout:
    """The layout read off the model built on the meta device (torch and transformers are
    imported here), in float32 and in bfloat16: a tensor whose element shrinks from 4 bytes to 2
    takes the base's dtype, any other keeps its own (rotary frequencies in float32, ...)."""
    return _built(json.dumps(config_dict, sort_keys=True))


@functools.lru_cache(maxsize=32)
def _built(config_text: str) -> Layout:
    import torch
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    from . import build, quantize
    from .layers import all_linear_names, is_adaptable, is_linear, layer_shape

    config_dict = json.loads(config_text)
    wide = build.instantiate(config_dict, "meta", torch.float32)
    narrow = build.instantiate(config_dict, "meta", torch.bfloat16)

    def tensors(pairs, others) -> tuple[tuple[str, int, int], ...]:
        sizes = {name: tensor.element_size() for name, tensor in others}
        return tuple((name, tensor.numel(), FOLLOWS_BUILD if (tensor.element_size(), sizes[name]) == (4, 2) else tensor.element_size())
                     for name, tensor in pairs)

    parameters = tensors(wide.named_parameters(), narrow.named_parameters())
    first = {id(tensor): name for name, tensor in wide.named_parameters()}
    aliases = tuple((name, first[id(tensor)]) for name, tensor in wide.named_parameters(remove_duplicate=False) if first[id(tensor)] != name)
    all_linear, quantized = set(all_linear_names(wide)), set(quantize.quantizable_names(wide))
    layers = tuple(Layer(name, *layer_shape(module), is_linear(module), name in all_linear, name in quantized,
                         module.bias.numel() if getattr(module, "bias", None) is not None else 0)
                   for name, module in wide.named_modules() if name and is_adaptable(module))
    model_type = config_dict["model_type"]
    targets = defaults.get(model_type)
    return Layout(model_type, parameters, aliases, tensors(wide.named_buffers(), narrow.named_buffers()), layers,
                  None if targets is None else tuple(targets))


# --------------------------------------------------------------------------- the cache

CACHE_LIBRARIES = ("torch", "transformers", "peft")
CACHE_SOURCES = ("layout.py", "build.py", "quantize.py", "layers.py")


def _cache_path(config_dict: dict[str, Any]) -> Path:
    """Where a built layout is kept: keyed by the config, the libraries' versions and a digest
    of the source that reads it."""
    from .gguf import cache_root

    text = json.dumps([config_digest(config_dict), _versions(), _source_digest()])
    return cache_root() / "layouts" / (hashlib.sha256(text.encode()).hexdigest()[:32] + ".json")


@functools.lru_cache(maxsize=None)
def _versions() -> list[str]:
    from importlib import metadata

    return [metadata.version(library) for library in CACHE_LIBRARIES]


@functools.lru_cache(maxsize=None)
def _source_digest() -> str:
    digest = hashlib.sha256()
    for part in CACHE_SOURCES:
        digest.update((Path(__file__).parent / part).read_bytes())
    return digest.hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    """A stored layout, or ``None`` when absent or unreadable (then it is built again)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Store it, renamed into place when whole; a cache that can't be written only costs time."""
    import os
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(data, stream)
        os.replace(temporary, path)
    except OSError:
        pass


# --------------------------------------------------------------------------- make layouts


def write_shipped() -> None:
    """Write the layouts the package ships, one for each name of the registry (``make layouts``)."""
    from . import registry

    SHIPPED.mkdir(exist_ok=True)
    for name in registry.names():
        config_dict = registry.load_config_dict(name)
        document = {"config": config_digest(config_dict), "layout": built(config_dict).as_json()}
        (SHIPPED / f"{name}.json").write_text(json.dumps(document, separators=(",", ":")) + "\n", encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover - make layouts runs it; tests/test_layout.py calls write_shipped
    write_shipped()
