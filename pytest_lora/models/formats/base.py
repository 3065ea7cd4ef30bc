"""What a quantization format answers, and the format of unquantized weights.

``Format`` is the whole contract between a backend and the rest of pytest-lora. Its defaults
describe plain torch layers (no quantization), so ``FORMAT`` here is the format of ``none``,
``fp32``, ``bf16`` and ``fp16``; a backend overrides what its layers do differently.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...specs import QuantSpec


class Format:
    """One quantization backend: how its layers are made, read, counted and merged.

    Flags that peft and the suites read:

    * ``peft_layer(quant)``: the class name of the LoRA layer peft must dispatch for this
      backend's layers. A quantized layer wrapped as a plain Linear is the trap: peft then adds
      the update to packed bytes, or refuses the layer.
    * ``all_linear``: peft's ``target_modules="all-linear"`` finds this backend's layers. When it
      does not, the adapter's targets are the names of the layers instead.
    * ``peft_counts_weights``: ``get_nb_trainable_parameters`` counts one per weight on this
      backend (it unpacks bitsandbytes' 4-bit bytes only).
    * ``computes_in_dtype(quant)``: a layer's forward is its dequantized weight times the input
      in the compute dtype (LLM.int8 also quantizes the activations, so its forward is not).
    * ``merge_requantizes``: merging writes W + s B A back in this format (peft re-quantizes).
    * ``reloads_merged``: transformers' ``save_pretrained`` of a merged model in this format and
      ``from_pretrained`` of what it wrote give the same model back (the merge suite checks it
      where this holds; for our in-place quantized torchao and HQQ bases transformers writes the
      layers' own state, which ``from_pretrained`` without their loader cannot read).
    """

    backend = "dtype"
    all_linear = True
    peft_counts_weights = True
    merge_requantizes = False
    reloads_merged = True

    def peft_layer(self, quant: QuantSpec) -> str:
        return "Linear"

    def computes_in_dtype(self, quant: QuantSpec) -> bool:
        return True

    # ----------------------------------------------------------------- availability and building

    def unavailable(self, quant: QuantSpec, device: str) -> str | None:
        """Why this backend cannot run ``quant`` on ``device``, once its library is installed."""
        return None

    def quantize_layer(self, weight: torch.Tensor, bias: torch.Tensor | None, quant: QuantSpec) -> nn.Module:
        """A quantized layer computing ``x @ weight.T + bias`` (``weight`` is (out, in))."""
        raise NotImplementedError(f"{self.backend} stores weights unquantized")

    def mark_model(self, model: nn.Module, quant: QuantSpec) -> None:
        """Set what transformers sets on a model it loaded in this format, and peft reads."""

    def pretrained_config(self, quant: QuantSpec) -> Any:
        """The ``quantization_config`` for ``from_pretrained`` (``None``: unquantized)."""
        return None

    def loads_pretrained_on(self, devices: set[str]) -> bool:
        """Whether transformers' loader quantizes a checkpoint in this format onto these device
        types (``cpu``, ``cuda``); where not, the checkpoint is loaded in the compute dtype and
        quantized in place, as registry bases are."""
        return True

    def after_build(self, model: nn.Module) -> None:
        """Settle a built or loaded base so that it stays as built while tests share it."""

    def fix_copy(self, module: nn.Module) -> None:
        """Repair one module of a ``copy.deepcopy`` of a base (references into the original)."""

    # ----------------------------------------------------------------- reading layers

    def owns(self, module: nn.Module) -> bool:
        """Whether ``module`` is a quantized layer of this backend."""
        return False

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """The layer's weight as float32, (out, in)."""
        return module.weight.data.float()

    @staticmethod
    def plain_tensors(module: nn.Module) -> list[torch.Tensor]:
        return list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))

    def stored_tensors(self, module: nn.Module) -> list[torch.Tensor]:
        """Every plain tensor whose storage the layer occupies: data, scales, tables, bias."""
        return self.plain_tensors(module)

    def weights_in(self, module: nn.Module) -> int:
        """The number of weights (and bias entries) the layer stands for."""
        return sum(p.numel() for p in module.parameters(recurse=False))

    def layer_state(self, model: nn.Module) -> Any:
        """What a test may change inside the layers that ``restore_layer_state`` puts back."""
        return None

    def restore_layer_state(self, model: nn.Module, state: Any) -> None:
        """Put the layers back as ``layer_state`` found them."""

    # ----------------------------------------------------------------- the memory model

    def tensor_bytes(self, rows: int, columns: int, quant: QuantSpec) -> int:
        """Bytes of a (rows, columns) weight stored in ``quant``, its constants included."""
        raise NotImplementedError(f"{self.backend} stores weights unquantized")


def plain_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold a tensor's data: itself, or for a tensor subclass (torchao's)
    the tensors its ``__tensor_flatten__`` names, recursively. Only plain tensors have storages."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, nn.Parameter):
        return [tensor]
    names, _ = flatten()
    return [part for name in names for part in plain_parts(getattr(tensor, name))]


FORMAT = Format()
