"""Putting a LoRA adapter on a shared base and taking it off again, leaving the base as it was.

``peft.get_peft_model`` changes the base in place: it swaps target layers for LoRA layers, wraps
``modules_to_save``, and sets ``requires_grad`` on every parameter (``bias="all"`` makes the
base's biases trainable, and a training step then changes them in place). ``attached`` records
the base's state, lets peft do its work, keeps a copy of every base parameter that peft made
trainable, then unloads with peft's own ``unload()``, writes those values back and puts every
``requires_grad`` flag and the training mode back. If peft fails half-way it strips whatever it had injected. ``BaseState.differences`` says
what, if anything, still differs; a non-empty answer is an error, because every later test
would measure a different model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import peft
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from . import formats


@dataclass(frozen=True)
class BaseState:
    """What must be the same after a test: the modules, the parameter objects and their flags.

    It holds references to the parameters (not copies: no memory), so that a parameter peft
    replaced by an equal object (DoRA on an LLM.int8 base re-creates each ``Int8Params``) can be
    put back, and one it replaced by different values is reported. It also keeps what each format
    lets a forward change inside its layers (LLM.int8's row scales, which bitsandbytes moves from
    the weight into the layer on the first forward).
    """

    modules: tuple[tuple[str, type], ...]
    parameters: tuple[tuple[str, nn.Parameter, bool], ...]
    training: bool
    layer_states: list[tuple[Any, Any]]
    hooks: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, model: nn.Module) -> "BaseState":
        return cls(
            hooks=hooks_of(model),
            modules=tuple((name, type(module)) for name, module in model.named_modules()),
            parameters=tuple((name, p, p.requires_grad) for name, p in model.named_parameters()),
            training=model.training,
            layer_states=formats.layer_states(model),
        )

    def restore(self, model: nn.Module) -> None:
        """Put back the original parameter objects (where the values are equal), flags, mode and
        the quantized layers' state."""
        current = dict(model.named_parameters())
        for name, original, requires_grad in self.parameters:
            now = current.get(name)
            if now is not None and now is not original and _same_values(now, original):
                owner, _, attribute = name.rpartition(".")
                model.get_submodule(owner)._parameters[attribute] = original
            original.requires_grad_(requires_grad)
        model.train(self.training)
        formats.restore_layer_states(model, self.layer_states)

    def differences(self, model: nn.Module) -> list[str]:
        found = []
        modules = tuple((name, type(module)) for name, module in model.named_modules())
        if modules != self.modules:
            changed = sorted({name for name, _ in set(modules) ^ set(self.modules)})
            found.append(f"modules differ: {changed[:3]}")
        current = dict(model.named_parameters())
        changed = [
            name
            for name, original, requires_grad in self.parameters
            if current.get(name) is not original or original.requires_grad != requires_grad
        ]
        if changed or len(current) != len(self.parameters):
            found.append(f"parameters differ (tensor or requires_grad): {(changed or sorted(current))[:3]}")
        if model.training != self.training:
            found.append(f"training mode {model.training} instead of {self.training}")
        hooks = hooks_of(model)
        if hooks != self.hooks:
            changed = sorted({name for name, _ in set(hooks) ^ set(self.hooks)})
            found.append(f"hooks differ (forward, pre-forward or backward): {changed[:3]}")
        return found


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def hooks_of(model: nn.Module) -> tuple[tuple[str, int], ...]:
    """(module name, number of hooks) for every module that has any: a hook left on a shared base
    (gradient checkpointing's input hook, say) changes every later step."""
    counts = ((name, sum(len(getattr(module, d, {})) for d in _HOOK_DICTS)) for name, module in model.named_modules())
    return tuple((name, count) for name, count in counts if count)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype, device and values (LLM.int8 scales are restored separately)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a.data, b.data)


class BaseModelChanged(RuntimeError):
    """A shared base model is not what it was before a test; later measurements would be wrong."""


@contextlib.contextmanager
def attached(base: nn.Module, lora_config: peft.LoraConfig) -> Iterator[peft.PeftModel]:
    """``base`` with a LoRA adapter, for the duration of the ``with`` block."""
    state = BaseState.of(base)
    peft_model = None
    trained_base: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    try:
        base_parameters = {id(p): p for p in base.parameters()}
        peft_model = peft.get_peft_model(base, lora_config)
        for parameter in peft_model.parameters():
            if parameter.requires_grad and id(parameter) in base_parameters:
                trained_base[id(parameter)] = (parameter, parameter.detach().clone())
        yield peft_model
    finally:
        detach(base, peft_model, state, trained_base.values())


def detach(base: nn.Module, peft_model: Any, state: BaseState, trained_base: Iterable[tuple[nn.Parameter, torch.Tensor]] = ()) -> None:
    """Remove the adapter and restore ``base`` to ``state``; raise if that is impossible."""
    strip_adapters(base, ModulesToSaveWrapper)  # peft's unload() would keep the trained copies
    if peft_model is not None:
        peft_model.unload()
    strip_adapters(base)
    with torch.no_grad():
        for parameter, original in trained_base:
            parameter.copy_(original)
    state.restore(base)
    problems = state.differences(base)
    if problems:
        raise BaseModelChanged("the shared base model was changed by the test: " + "; ".join(problems))


def strip_adapters(model: nn.Module, kinds: type | tuple[type, ...] = (ModulesToSaveWrapper, BaseTunerLayer)) -> None:
    """Replace every LoRA layer or modules_to_save wrapper (of ``kinds``) in ``model`` by the original module."""
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(prefix + ".") for prefix in replaced):
            continue  # inside a wrapper already taken out
        if not isinstance(module, kinds):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            model.set_submodule(name, module.original_module)
        else:
            model.set_submodule(name, module.get_base_layer())
        replaced.append(name)


def lora_config_for(lora: Any, config_dict: dict[str, Any], quant: Any = None) -> peft.LoraConfig:
    """The ``peft.LoraConfig`` of a LoRA spec on a model, with the task type of the model's head.

    On a format whose layers peft's ``all-linear`` does not find (HQQ's), ``all-linear`` becomes
    the names of the layers it means on the unquantized model, so that the adapter is the same
    on every format: peft would otherwise refuse the config, or adapt fewer layers.
    """
    from . import build
    from .layers import all_linear_names

    kwargs = lora.peft_kwargs()
    if kwargs["target_modules"] == "all-linear" and quant is not None and not formats.of(quant).all_linear:
        kwargs["target_modules"] = all_linear_names(build.build_meta(config_dict))
    return peft.LoraConfig(**kwargs, task_type=build.task_type(config_dict))


def dispatch_problems(peft_model: nn.Module, quant: Any) -> list[str]:
    """LoRA layers that peft did not dispatch to the format's own class, as sentences.

    The trap this catches: a quantized layer wrapped by peft's plain ``Linear`` (a bitsandbytes
    model without transformers' flags) trains, but merges into the packed bytes."""
    found = formats.of(quant)
    expected = found.peft_layer(quant)
    wrong = [f"{name}: peft's {type(layer).__name__}, not {expected}" for name, layer in peft_model.named_modules()
             if isinstance(layer, BaseTunerLayer) and formats.layer_format(layer.get_base_layer()) is not None
             and type(layer).__name__ != expected]
    return wrong[:3]
