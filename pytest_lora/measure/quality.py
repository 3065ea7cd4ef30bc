"""Quality of a fine-tune: is LoRA on a quantized base as good as LoRA on a 16-bit one?

The claims measured (``suites/test_quality.py`` says on what):

* QLoRA (Dettmers et al. 2023, Table 2): the quantized bases themselves differ before any
  training (mean perplexity Int4 34.34, FP4 31.07, NF4+DQ 27.41): the held-out loss of each
  format's base on the old skill, against the full-precision base's;
* QLoRA (Table 4): NF4 + LoRA matches 16-bit + LoRA after fine-tuning: the held-out loss on the
  new skill after the same budget, paired by seed with the 16-bit LoRA reference;
* LoRA (Hu et al. 2021, Table 6): rank barely matters; LoRA Without Regret (2025): LoRA's best
  learning rate is about 10x full fine-tuning's;
* LoftQ, PiSSA: an adapter initialised from the quantization residual or the principal singular
  directions starts closer to the full-precision model (``init_weight_error``) and ends better;
* MLPerf's LoRA benchmark: time to a quality target, not time per step (``steps_to_target``).

A run fine-tunes one base with a budget of steps and evaluates the held-out set at fixed points
(``eval_steps``): the learning curve. Evaluation does not train: no trainable weight and no
optimizer state changes, and the training batches are drawn from their own generator, so a curve
with more points ends where one with fewer does. Only the training steps are timed.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import peft
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..models import build, formats, quantize
from . import merge, tasks

EVAL_POINTS = 7  # evaluations of a curve, the first before any step and the last after the budget
# The target: this fraction of the 16-bit LoRA's improvement of the held-out loss. At 90% the
# reference itself reached it only at its last evaluation on the task model (its curve still
# falling), so every config read "at the end"; 75% falls inside the curve.
TARGET_FRACTION = 0.75


@dataclass(frozen=True)
class Point:
    """One evaluation of a curve: after ``step`` steps and ``seconds`` of training."""

    step: int
    seconds: float
    loss: float
    accuracy: float
    exact: float | None = None


@dataclass(frozen=True)
class Run:
    """One fine-tune: its curve, where it started, and what it must leave as it was."""

    curve: tuple[Point, ...]
    init_weight_error: float  # ||W - (base + s B A)||^2 / ||W||^2 over the adapted layers, at initialisation
    init_loss_a: float  # held-out loss on the old skill of base + initial adapter
    evaluation_trains_nothing: bool
    storage_unchanged: bool  # the base's stored (quantized) tensors are bitwise the same after training

    @property
    def final(self) -> Point:
        return self.curve[-1]


def eval_steps(steps: int, points: int = EVAL_POINTS) -> list[int]:
    """``points`` evaluation steps from 0 to ``steps``, evenly spaced (fewer when steps are few)."""
    return sorted({round(steps * k / (points - 1)) for k in range(points)})


def target_loss(before: float, after: float, fraction: float = TARGET_FRACTION) -> float | None:
    """The held-out loss a run must reach: ``fraction`` of the reference's improvement from
    ``before`` to ``after``; ``None`` when the reference did not improve (a diverged reference
    would set a target above the start, "reached" before the first step)."""
    if after >= before:
        return None
    return before - fraction * (before - after)


def time_to_target(curve: tuple[Point, ...], target: float) -> Point | None:
    """The first evaluation at or below ``target`` (``None``: not reached within the budget)."""
    return next((point for point in curve if point.loss <= target), None)


def summary(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# --------------------------------------------------------------------------- the base in a format


def base_in_format(config: dict[str, Any], state: dict[str, torch.Tensor], quant: Any, device: str) -> nn.Module:
    """A model of ``config`` holding ``state`` (float32 weights) stored as ``quant``, quantized in place."""
    dtype = getattr(torch, quant.dtype) if quant.dtype else torch.float32
    model = build.instantiate(config, device, dtype)
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    return quantize.quantize_model(model, quant) if quant.is_quantized else model


def peft_init(init: str) -> dict[str, Any]:
    """``peft.LoraConfig`` arguments of an init of ``specs.INITS``."""
    if init == "default":
        return {"init_lora_weights": True}
    if init == "loftq":  # as a dict, as LoraConfig's __post_init__ leaves it (``_with`` sets fields after it ran)
        return {"init_lora_weights": "loftq", "loftq_config": vars(peft.LoftQConfig(loftq_bits=4, loftq_iter=1))}
    return {"init_lora_weights": init}


def adapted_base(config: dict[str, Any], state: dict[str, torch.Tensor], quant: Any, lora_config: peft.LoraConfig, init: str,
                 device: str) -> nn.Module:
    """The base stored as ``quant`` with a LoRA adapter initialised by ``init``.

    An init that leaves the base as it is (``default``, ``gaussian``) is peft's on the stored
    base. One that moves part of the weight into the adapter (PiSSA, OLoRA, LoftQ) runs on the
    float32 weights first; the base then holds the residual, stored as ``quant``: PiSSA's QPiSSA
    and LoftQ's recipe, since peft can't factor a weight it only has quantized.
    """
    config_with_init = _with(lora_config, **peft_init(init))
    if init not in ("pissa", "olora", "loftq"):
        return peft.get_peft_model(base_in_format(config, state, quant, device), config_with_init)
    with _loftq_compute_device(init):
        full = peft.get_peft_model(base_in_format(config, state, _FLOAT32, device), config_with_init)
    _check_rank_fits(full, lora_config.r, init)
    if init == "loftq":
        _scale_loftq_adapter(full)
    adapter = {key: value.detach().clone() for key, value in peft.get_peft_model_state_dict(full).items()}
    residual = {name.replace(".base_layer", ""): value.detach().cpu().clone()
                for name, value in full.get_base_model().state_dict().items() if "lora_" not in name}
    del full
    model = peft.get_peft_model(base_in_format(config, residual, quant, device), _with(lora_config, init_lora_weights=True))
    peft.set_peft_model_state_dict(model, adapter)
    return model


def _check_rank_fits(model: nn.Module, rank: int, init: str) -> None:
    """PiSSA and OLoRA factor each weight into ``rank`` directions: a layer with fewer (a GQA
    model's k and v projections are narrow) gets a smaller adapter than the config's, which no
    base of that config can load. Said here, naming the layer, rather than as a state-dict error."""
    for name, layer in merge.lora_layers(model).items():
        weight = layer.get_base_layer().weight
        if min(weight.shape) < rank:
            raise ValueError(f"init {init!r} needs a rank of at most the smaller side of every adapted layer: "
                             f"{merge.adapted_module_name(name)} is {tuple(weight.shape)}, rank {rank}")


class _CudaOnTheCpu(TorchFunctionMode):
    """Sends a tensor's moves to CUDA to the CPU instead.

    peft's LoftQ (``peft.utils.loftq_utils.loftq_init``) computes on CUDA whatever device the model
    is on (``compute_device = "xpu" if is_xpu_available() else "cuda"``): it moves each weight there,
    quantizes it with bitsandbytes' NF4, dequantizes it and factors the residual by SVD, and moves
    the results back. All of that runs on the CPU too (bitsandbytes' NF4 included), so on a machine
    without CUDA this mode redirects the moves and peft's own algorithm runs unchanged, rather than a
    copy of it that could drift from peft's.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda(arg) else arg for arg in args)
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _is_cuda(value: Any) -> bool:
    return isinstance(value, (str, torch.device)) and torch.device(value).type == "cuda"


def _loftq_compute_device(init: str) -> contextlib.AbstractContextManager:
    """Where peft's LoftQ computes: CUDA where there is one, else the CPU (``_CudaOnTheCpu``)."""
    return _CudaOnTheCpu() if init == "loftq" and not torch.cuda.is_available() else contextlib.nullcontext()


def _scale_loftq_adapter(model: nn.Module) -> None:
    """Divides LoftQ's adapter by the LoRA scaling ``lora_alpha / r``, a square root on each side.

    LoftQ factors the residual ``W - Q`` as ``B A`` so that ``Q + B A`` approximates ``W``; peft
    stores ``B`` and ``A`` as they are (``LoraLayer.loftq_init``), and the layer then adds
    ``s B A``: at ``lora_alpha = 2 r`` the start is ``Q + 2 B A``, no closer to ``W`` than ``Q``
    alone (``B A`` is the residual's head, orthogonal to its tail, so ``||R - 2 B A|| = ||R||``;
    peft issue #1982: LoftQ's init ignores the scaling, right only at ``lora_alpha = r``). peft's
    PiSSA divides by the scaling the same way (``pissa_init``: ``S / scaling``, split as square
    roots), so LoftQ is compared with the other inits at the matrix's own alpha.
    """
    with torch.no_grad():
        for layer in merge.lora_layers(model).values():
            for adapter, scaling in layer.scaling.items():
                root = math.sqrt(scaling)
                layer.lora_A[adapter].weight.div_(root)
                layer.lora_B[adapter].weight.div_(root)


class _Float32:
    """The float32 storage the residual inits factor the weights in."""

    dtype, is_quantized = "float32", False


_FLOAT32 = _Float32()


def _with(lora_config: peft.LoraConfig, **changes: Any) -> peft.LoraConfig:
    """A copy of ``lora_config`` with ``changes`` (the caller's config is shared by other runs)."""
    changed = copy.deepcopy(lora_config)
    for name, value in changes.items():
        setattr(changed, name, value)
    return changed


# --------------------------------------------------------------------------- measuring


def init_weight_error(model: nn.Module, state: dict[str, torch.Tensor], lora_config: peft.LoraConfig) -> float:
    """How far base + initial adapter is from the full-precision weights, over the adapted layers:
    sum ||W - (dequantized base + s B A)||^2 over sum ||W||^2, in float64. Zero for a float32 base
    with B = 0; the quantization error of the adapted layers for a quantized one."""
    error = norm = 0.0
    for name, layer in merge.lora_layers(model).items():
        original = state[merge.adapted_module_name(name) + ".weight"].double()
        effective = merge.dequantized(layer.get_base_layer()).double().cpu() + merge.expected_delta(layer, lora_config).cpu()
        error += (original - effective).pow(2).sum().item()
        norm += original.pow(2).sum().item()
    return error / norm


def stored_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base's stored tensors (quantized storage included), copied: what training must not change."""
    return {name: value.detach().clone() for name, value in model.state_dict().items() if "lora_" not in name}


def fine_tune(model: nn.Module, sample: Callable[[torch.Generator], torch.Tensor], evaluate: Callable[[nn.Module], tuple],
              steps: int, lr: float, seed: int, device: str, points: int = EVAL_POINTS) -> tuple[tuple[Point, ...], bool]:
    """AdamW on the causal loss for ``steps`` steps, evaluating at ``eval_steps(steps, points)``.

    Returns the curve and whether every evaluation left the trainable weights and the optimizer's
    state exactly as they were (an evaluation that trained would make the curve a lie)."""
    generator = torch.Generator().manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    curve, at, seconds, untouched = [], set(eval_steps(steps, points)), 0.0, True
    for step in range(steps + 1):
        if step in at:
            before = [p.detach().clone() for p in trainable], _optimizer_state(optimizer)
            curve.append(Point(step, seconds, *evaluate(model)))
            untouched &= _same(before[0], [p.detach() for p in trainable]) and _same(before[1], _optimizer_state(optimizer))
        if step == steps:
            break
        model.train()
        ids = sample(generator).to(device)
        started = _clock(device)
        tasks.causal_loss(model(input_ids=ids).logits, ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += _clock(device) - started
    return tuple(curve), untouched


def _clock(device: str) -> float:
    if str(device).startswith("cuda"):  # pragma: no cover - CUDA only: wait for the step's kernels
        torch.cuda.synchronize()
    return time.perf_counter()


def _optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [value.detach().clone() for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Bitwise equal, tensor by tensor; a tensor subclass (torchao's ``Int8Tensor``, which has no
    ``torch.equal``) by the plain tensors that hold its data (``formats.plain_parts``)."""
    def parts(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [part for tensor in tensors for part in formats.plain_parts(tensor)]

    x, y = parts(a), parts(b)
    return len(a) == len(b) and len(x) == len(y) and all(torch.equal(p, q) for p, q in zip(x, y))


def run(config: dict[str, Any], state: dict[str, torch.Tensor], quant: Any, lora_config: peft.LoraConfig, init: str, task: Any,
        steps: int, lr: float, seed: int, device: str) -> Run:
    """One LoRA fine-tune of ``state`` stored as ``quant`` on ``task``'s new skill (``task``: a
    ``forgetting.Experiment``): adapter initialised by ``init`` under ``seed``, then trained."""
    torch.manual_seed(seed)
    model = adapted_base(config, state, quant, lora_config, init, device)
    weight_error = init_weight_error(model, state, lora_config)
    init_loss_a = tasks.evaluate(model, task.forget_eval)[0]
    stored = stored_tensors(model)

    def evaluate(m: nn.Module) -> tuple:
        return tasks.evaluate(m, task.learn_eval, task.exact_match, with_exact=True)

    curve, untouched = fine_tune(model, task.learn_batches, evaluate, steps, lr, seed, device)
    unchanged = _same(list(stored.values()), list(stored_tensors(model).values()))
    return Run(curve, weight_error, init_loss_a, untouched, unchanged)


def run_full(config: dict[str, Any], state: dict[str, torch.Tensor], task: Any, steps: int, lr: float, seed: int, device: str) -> Run:
    """Full fine-tuning of the float32 weights with the same budget and batches (it starts from the
    full-precision weights themselves: no initial error, and the base is what it trains)."""
    torch.manual_seed(seed)
    model = base_in_format(config, state, _FLOAT32, device)
    model.requires_grad_(True)

    def evaluate(m: nn.Module) -> tuple:
        return tasks.evaluate(m, task.learn_eval, task.exact_match, with_exact=True)

    curve, untouched = fine_tune(model, task.learn_batches, evaluate, steps, lr, seed, device)
    return Run(curve, 0.0, float("nan"), untouched, True)
