"""``pytest-lora estimate MODEL``: will this fine-tune fit, what takes the memory, how sure are we.

The memory suite's analytic step (``measure.step``) over the model's layout (``models.layout``:
shipped for the registry's models, read once on the meta device for any other): no weight is
built and, for a registry model, torch is not even imported, so an 8B or a 70B model is
estimated in a fraction of a second. It prints the step's memory by component (base weights in
their format, the adapter, its gradients, the optimizer's state, the saved activations, the
logits with their gradients, the workspace a GPU adds), the total, and how well the model has
held for that architecture, against what.

* several values of an option (``--quant bf16,nf4 --seq 2048,8192``) give one table of every
  combination;
* ``--budget 24GiB`` gives the largest batch (``--fit seq``: the longest sequence at ``--batch``)
  that fits, with and without gradient checkpointing, and the component that decides;
* ``--against RUN.json`` sets each config the memory suite measured in a results file beside its
  estimate, component by component, and names the gap (``against``).

A bad argument is exit 4 with what is wrong and what is allowed, as everywhere in pytest-lora.
This module may build on the meta device (``models``) and ask the step model (``measure``), so it
is not in ``cli``: ``console.main`` sends ``estimate`` here.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from .gate.rules import RuleError, size_in_bytes
from .specs import OPTIMIZERS, QUANTIZATIONS, TARGET_KEYWORDS, VARIANTS, MatrixError, WorkloadSpec, shown, whole_number

USAGE_ERROR = 4
GIB = 2**30

# cuBLAS keeps a workspace per thread that has run a matrix product (the main thread and
# autograd's backward thread), 32 MiB each on sm90, allocated through torch's allocator and never
# returned (``measure.gpu.Gpu.warm_up``): a GPU's peak allocated bytes hold both.
GPU_WORKSPACE = 2 * 32 * 2**20

# How well the step model has held, each bound checked by tests/test_estimate.py:
CPU_TOLERANCE = 0.05  # saved activations against what autograd keeps, tiny models on the CPU, dropout included
H200_TOLERANCE = 0.02  # the step's total against torch's peak allocated on an H200 (references.H200)
H200_CKPT_TOLERANCE = 0.12  # the same with gradient checkpointing (one config measured)
H200_FAMILIES = ("llama",)  # the model types of the H200's shapes

SEARCH_LIMIT = 2**24  # the largest batch or sequence --budget looks for


class EstimateError(ValueError):
    """A bad argument: the message says which, what it was and what is allowed."""


# --------------------------------------------------------------------------- one config


@dataclass(frozen=True)
class Setup:
    """One config of a fine-tune, as the estimate takes it: everything that changes its memory."""

    quant: str = "nf4"
    rank: int = 16
    targets: str | tuple[str, ...] = "all-linear"
    seq: int = 2048
    batch: int = 1
    grad_ckpt: bool = False
    optimizer: str = "adamw"
    variant: str = "lora"
    dropout: float = 0.0

    @property
    def workload(self) -> WorkloadSpec:
        return WorkloadSpec(self.seq, self.batch, self.grad_ckpt)

    @property
    def targets_text(self) -> str:
        return self.targets if isinstance(self.targets, str) else ",".join(self.targets)

    def describe(self) -> str:
        variant = "" if self.variant == "lora" else f" ({self.variant})"
        dropout = f", dropout {self.dropout:g}" if self.dropout else ""
        ckpt = "with" if self.grad_ckpt else "no"
        return (f"{self.quant}, LoRA r={self.rank}{variant} on {self.targets_text}{dropout}, {self.optimizer}, "
                f"batch {self.batch} x {self.seq:,d} tokens, {ckpt} gradient checkpointing")


COMPONENTS = {  # key -> label; the estimate's components in the order they are printed
    "weights": "base weights ({quant})",
    "adapter": "adapter (fp32)",
    "gradients": "adapter gradients (fp32)",
    "optimizer": "optimizer state ({optimizer})",
    "activations": "saved activations",
    "logits": "logits and their gradients",
    "workspace": "GPU workspace (cuBLAS)",
}
GROWING = ("activations", "logits")  # the components that grow with the batch and the sequence


@dataclass(frozen=True)
class MemoryEstimate:
    """The memory of one training step of ``model`` in ``setup``, component by component (bytes;
    ``None`` where the architecture's activations are not modelled), and how sure we are."""

    model: str
    model_type: str
    setup: Setup
    parts: dict[str, int | None]
    fidelity: str

    @property
    def total(self) -> int | None:
        """The step's peak allocated bytes on a GPU: every component at the peak."""
        values = list(self.parts.values())
        return None if any(value is None for value in values) else sum(values)

    @property
    def deciding(self) -> str:
        """The largest component that grows with the tokens: what a longer batch runs out on."""
        return max(GROWING, key=lambda key: self.parts[key] or 0)

    def label(self, key: str) -> str:
        return COMPONENTS[key].format(quant=self.setup.quant, optimizer=self.setup.optimizer)


def estimate_memory(model: str | Path, quant: str = "nf4", rank: int = 16, targets: str | Sequence[str] = "all-linear", seq: int = 2048,
                    batch: int = 1, grad_ckpt: bool = False, optimizer: str = "adamw", variant: str = "lora",
                    dropout: float = 0.0) -> MemoryEstimate:
    """The memory of one LoRA / QLoRA training step of ``model`` (a registry name, a config.json,
    a checkpoint directory or a GGUF file), on the meta device: no weights are built.

    ``targets``: ``"all-linear"``, ``"default"`` (peft's per-architecture default) or module names.
    Raises ``EstimateError`` for a bad argument, saying what is allowed.
    """
    names = targets if isinstance(targets, str) else tuple(targets)
    setup = checked(Setup(quant, rank, names, seq, batch, grad_ckpt, optimizer, variant, dropout))
    return estimate(str(model), setup)


def checked(setup: Setup) -> Setup:
    """``setup`` if every value is allowed, else an ``EstimateError`` naming the first that is not."""
    _one_of("--quant", setup.quant, QUANTIZATIONS, "a quantization")
    _one_of("--optimizer", setup.optimizer, OPTIMIZERS, "an optimizer")
    _one_of("--variant", setup.variant, VARIANTS, "a LoRA variant")
    for where, value, what in (("--rank", setup.rank, "a rank"), ("--seq", setup.seq, "a sequence length"), ("--batch", setup.batch, "a batch size")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EstimateError(f"{where}: {shown(value)} is not {what}; allowed: a whole number >= 1")
    if not 0 <= setup.dropout < 1:
        raise EstimateError(f"--dropout: {shown(setup.dropout)} is not a dropout probability; allowed: 0 <= p < 1")
    if not setup.targets:
        raise EstimateError("--targets: no module names; allowed: all-linear, default or names such as q_proj,v_proj")
    return setup


def _one_of(where: str, value: Any, allowed: Iterable[str], what: str) -> None:
    if value not in allowed:
        raise EstimateError(f"{where}: {shown(value)} is not {what}; allowed: {', '.join(allowed)}")


def estimate(model: str, setup: Setup) -> MemoryEstimate:
    """The estimate of a checked ``setup``: the step model is built once per model and adapter
    (``_step_model``) and evaluated at the setup's workload."""
    model_type, step = _step_model(model, setup.quant, setup.rank, setup.targets, setup.optimizer, setup.variant, setup.dropout)
    at = step.at(setup.workload)
    parts = {
        "weights": at.weights,
        "adapter": at.training.parameters,
        "gradients": at.training.gradients,
        "optimizer": at.training.optimizer,
        "activations": at.peak_activations,
        "logits": at.peak_logits,
        "workspace": GPU_WORKSPACE,
    }
    return MemoryEstimate(model, model_type, setup, parts, fidelity(model_type, step.terms is not None))


@functools.lru_cache(maxsize=64)
def _step_model(model: str, quant: str, rank: int, targets: str | tuple[str, ...], optimizer: str, variant: str, dropout: float) -> tuple[str, Any]:
    """(model_type, ``measure.step.StepModel``) of a model and adapter, for any workload: plain
    arithmetic over the model's layout (``models.layout.of``: shipped for the registry's models,
    else cached after its first build on the meta device), without torch unless the layout has
    to be built or an 8-bit optimizer's constants read."""
    from .measure import step
    from .models import layout

    config, name = _config(model)
    lora = _lora_config(rank, targets, variant, dropout)
    spec = OPTIMIZERS[optimizer]
    try:
        model_step = step.step_model(layout.of(config, name), config, QUANTIZATIONS[quant], lora, spec, eight_bit=_eight_bit(spec))
    except (KeyError, ValueError, NotImplementedError) as error:  # an architecture transformers doesn't know, no default targets, ...
        raise EstimateError(f"MODEL: {model}: cannot be estimated ({error}); allowed: an architecture transformers knows, "
                            "targets it has") from None
    if not model_step.training.parameters:
        shown_targets = targets if isinstance(targets, str) else ",".join(targets)
        raise EstimateError(f"--targets: {shown_targets} adapt no layer of {model}; allowed: all-linear, default or the names "
                            "of its Linear layers, such as q_proj,v_proj")
    return config["model_type"], model_step


def _eight_bit(spec: Any) -> tuple[int, int] | None:
    """The installed bitsandbytes' constants for an 8-bit optimizer (imports it), else nothing."""
    if spec.bits != 8:
        return None
    from .measure import optimizers

    return optimizers.eight_bit_constants(spec)


def _config(model: str) -> tuple[dict[str, Any], str | None]:
    """The model's config.json as a dict, checked for sizes that are not sizes, and its registry
    name (``None`` for a file)."""
    from .models import resolve, validate

    try:
        spec = resolve.resolve_model(model, "MODEL")
        config = spec.config_dict()
    except MatrixError as error:
        raise EstimateError(str(error)) from None
    problems = validate.size_problems(config)
    if problems:
        raise EstimateError(f"MODEL: {model}: its config.json has fields that are not sizes: {'; '.join(problems)}; "
                            "allowed: whole numbers >= 1")
    return config, spec.name if spec.kind == "registry" else None


def _lora_config(rank: int, targets: str | tuple[str, ...], variant: str, dropout: float) -> Any:
    """What ``measure.params`` reads of a ``peft.LoraConfig`` (``None`` targets: peft's default)."""
    from types import SimpleNamespace

    target_modules = None if targets == "default" else targets if isinstance(targets, str) else list(targets)
    return SimpleNamespace(r=rank, target_modules=target_modules, lora_dropout=dropout, use_dora=variant == "dora",
                           rank_pattern={}, bias="none", modules_to_save=None)


def fidelity(model_type: str, modelled: bool) -> str:
    """How good the estimate is for this architecture: measured against what, within how much."""
    from .measure.step import ACTIVATION_FAMILIES

    if not modelled:
        return (f"activations are not modelled for model_type {model_type!r} (modelled: {', '.join(ACTIVATION_FAMILIES)}): "
                "weights, adapter, gradients and optimizer state are exact, the total is not given")
    cpu = (f"saved activations within {CPU_TOLERANCE:.0%} of what autograd keeps for the tiny {model_type} model on the CPU "
           "(dropout included)")
    if ACTIVATION_FAMILIES[model_type] in H200_FAMILIES:
        return (f"{cpu}; the total within {H200_TOLERANCE:.0%} of torch's peak allocated on an H200 (Llama-3-8B and "
                f"Llama-3.2-1B shapes, bf16 and nf4), {H200_CKPT_TOLERANCE:.0%} with gradient checkpointing; reserved and "
                "NVML bytes are higher (allocator cache, CUDA context: --against)")
    return f"{cpu}; no GPU peak measured for this family: the total is the model's sum, unchecked on a GPU"


# --------------------------------------------------------------------------- --budget


@dataclass(frozen=True)
class Fit:
    """The largest value of ``vary`` (batch or seq) whose step fits ``budget``; 0 when not even 1
    fits. ``at`` is the estimate at that value (at 1 when nothing fits); ``capped`` when the search
    stopped at ``SEARCH_LIMIT``."""

    vary: str
    value: int
    budget: int
    at: MemoryEstimate
    capped: bool = False


def largest_fitting(model: str, setup: Setup, budget: int, vary: str = "batch") -> Fit:
    """The largest batch (``vary="seq"``: sequence) of ``setup`` whose total fits ``budget``:
    doubling, then bisection (the total grows with the tokens). A budget below what the step holds
    without a token (weights, adapter, gradients, optimizer state, workspace) is an ``EstimateError``."""
    first = estimate(model, replace(setup, **{vary: 1}))
    if first.total is None:
        raise EstimateError(f"--budget: {first.fidelity}; allowed: a model whose activations are modelled")
    fixed = first.total - sum(first.parts[key] for key in GROWING)
    if fixed > budget:
        raise EstimateError(f"--budget: {_gib(budget)} is below what {model} holds before its first token: {_gib(fixed)} "
                            f"(weights, adapter, gradients, optimizer state); allowed: a budget above {_gib(fixed)}")

    def fits(value: int) -> bool:
        return estimate(model, replace(setup, **{vary: value})).total <= budget

    if not fits(1):
        return Fit(vary, 0, budget, first)
    low = 1
    while low < SEARCH_LIMIT and fits(min(2 * low, SEARCH_LIMIT)):
        low = min(2 * low, SEARCH_LIMIT)
    high = min(2 * low, SEARCH_LIMIT + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return Fit(vary, low, budget, estimate(model, replace(setup, **{vary: low})), capped=low == SEARCH_LIMIT)


def fit_line(fit: Fit) -> str:
    """One sentence: what fits, at what total, and what decides."""
    setup = fit.at.setup
    ckpt = "with" if setup.grad_ckpt else "without"
    fixed = f"at seq {setup.seq:,d}" if fit.vary == "batch" else f"at batch {setup.batch}"
    if not fit.value:
        return (f"{ckpt} gradient checkpointing: nothing fits {_gib(fit.budget)} {fixed}: {fit.vary} 1 needs {_gib(fit.at.total)}, "
                f"{fit.at.label(fit.at.deciding)} {_gib(fit.at.parts[fit.at.deciding])}")
    more = f" (the search stops at {SEARCH_LIMIT:,d})" if fit.capped else ""
    return (f"{ckpt} gradient checkpointing: largest {fit.vary} {fit.value:,d}{more} {fixed}: {_gib(fit.at.total)} of "
            f"{_gib(fit.budget)}; deciding: {fit.at.label(fit.at.deciding)} ({_gib(fit.at.parts[fit.at.deciding])})")


# --------------------------------------------------------------------------- printing


def _gib(value: int | None) -> str:
    return "not modelled" if value is None else f"{value / GIB:,.2f} GiB"


def breakdown(result: MemoryEstimate) -> list[list[str]]:
    """The rows of one estimate: each component, then the total."""
    rows = [[result.label(key), _gib(value)] for key, value in result.parts.items()]
    return rows + [["total (peak allocated on a GPU)", _gib(result.total)]]


def matrix_rows(results: list[MemoryEstimate], varying: list[str]) -> tuple[list[str], list[list[str]]]:
    """One row per config: the options that vary, each component in GiB, the total."""
    header = [*varying, *(key for key in COMPONENTS), "total"]
    body = []
    for result in results:
        options = [str(_shown_option(result.setup, name)) for name in varying]
        values = [_number(value) for value in result.parts.values()]
        body.append(options + values + [_number(result.total)])
    return header, body


def _shown_option(setup: Setup, name: str) -> Any:
    return setup.targets_text if name == "targets" else getattr(setup, name)


def _number(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:,.2f}"


def render(header: list[str] | None, body: list[list[str]], text_columns: int) -> str:
    """A plain rich table (imported when printed); numbers right-aligned."""
    import io

    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD if header else None, show_header=header is not None, pad_edge=False, show_edge=False)
    for index in range(len(body[0])):
        table.add_column(header[index] if header else "", justify="left" if index < text_columns else "right")
    for row in body:
        table.add_row(*row)
    buffer = io.StringIO()
    Console(file=buffer, width=200, color_system=None, highlight=False).print(table)
    return buffer.getvalue().rstrip() + "\n"


# --------------------------------------------------------------------------- --against


MEASURED = (  # component, the memory suite's metric, how the estimate's side is read
    ("weights", "weight_bytes"),
    ("adapter", "adapter_bytes"),
    ("gradients", "gradient_bytes"),
    ("optimizer", "optimizer_state_bytes"),
    ("activations", "activation_bytes"),
)


def against_lines(path: Path) -> list[str]:
    """Each config the memory suite measured in a results file, beside its estimate: component by
    component, then (from a GPU run) the step's peak and the gaps that torch, its allocator and
    the driver add, each named."""
    from .results import baseline

    try:
        document = baseline.read(Path(path), "--against")
    except baseline.BaselineError as error:
        raise EstimateError(str(error)) from None
    weights, configs = _measured_configs(document["records"])
    if not configs:
        raise EstimateError(f"--against: {str(path)!r} holds no training step measured by the memory suite; "
                            "allowed: the results of a run with the memory suite")
    lines = []
    for (model, quant, _, _), metrics in configs.items():
        record = metrics.pop("_record")
        metrics.setdefault("weight_bytes", weights.get((model, quant)))
        lines += _config_lines(record, metrics)
    return lines


def _measured_configs(records: list[dict[str, Any]]) -> tuple[dict[tuple[str, str], int], dict[tuple, dict[str, Any]]]:
    """The weight bytes of each (model, quant), and the step metrics of each config (its records joined)."""
    import json

    weights, configs = {}, {}
    for record in records:
        if record.get("suite") != "memory" or record.get("status") != "ok":
            continue
        metrics = record.get("metrics") or {}
        if "weight_bytes" in metrics:
            weights[(record["model"], record["quant"])] = metrics["weight_bytes"]
        if record.get("lora") and record.get("workload") and ("activation_bytes" in metrics or "peak_allocated_bytes" in metrics):
            key = (record["model"], record["quant"], json.dumps(record["lora"], sort_keys=True), json.dumps(record["workload"], sort_keys=True))
            joined = configs.setdefault(key, {"_record": record})
            joined.update({name: value for name, value in metrics.items() if value is not None})
    return weights, configs


def _setup_of(record: dict[str, Any]) -> Setup:
    lora, workload = record["lora"], record["workload"]
    targets = lora["targets"] if isinstance(lora["targets"], str) else tuple(lora["targets"])
    return Setup(record["quant"], lora["r"], targets, workload["seq_len"], workload["batch"], workload["grad_ckpt"],
                 workload.get("optimizer", "adamw"), lora["variant"], lora["dropout"])


def _config_lines(record: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    setup = _setup_of(record)
    title = f"{record['model']}: {setup.describe()}"
    if record["lora"].get("bias", "none") != "none" or record["lora"].get("modules_to_save"):
        return [title, "  not estimated: bias and modules_to_save are not in the estimate's setup"]
    try:
        result = estimate(record["model"], setup)
    except EstimateError as error:
        return [title, f"  not estimated: {error}"]
    rows = [[result.label(key), _gib(metrics.get(metric)), _gib(result.parts[key]), _ratio(metrics.get(metric), result.parts[key])]
            for key, metric in MEASURED if metrics.get(metric) is not None]
    rows += _gpu_rows(result, metrics)
    header = ["component", "measured", "estimate", "measured/estimate"]
    return [title, render(header, rows, 1).rstrip("\n"), *("  " + gap for gap in gaps(result, metrics))]


def _ratio(measured: int | None, estimated: int | None) -> str:
    return "-" if not measured or not estimated else f"{measured / estimated:.3f}"


def _gpu_rows(result: MemoryEstimate, metrics: dict[str, Any]) -> list[list[str]]:
    """The step's peak above the process's baseline against the estimate without the workspace
    (the baseline holds it), and the baseline against the workspace."""
    peak, baseline_bytes = metrics.get("peak_allocated_bytes"), metrics.get("process_baseline_bytes")
    if peak is None or baseline_bytes is None or result.total is None:
        return []
    step = result.total - GPU_WORKSPACE
    return [["step's peak allocated (GPU, above the baseline)", _gib(peak - baseline_bytes), _gib(step), _ratio(peak - baseline_bytes, step)],
            ["process baseline (GPU: cuBLAS workspaces, ...)", _gib(baseline_bytes), _gib(GPU_WORKSPACE), _ratio(baseline_bytes, GPU_WORKSPACE)]]


def gaps(result: MemoryEstimate, metrics: dict[str, Any]) -> list[str]:
    """What a GPU run measured beyond the estimate, each gap with its name."""
    found = []
    activations, estimated = metrics.get("activation_bytes"), result.parts["activations"]
    if activations is not None and estimated:
        found.append(f"saved activations: {_signed(activations - estimated)} against the model "
                     f"({activations / estimated - 1:+.1%}; what autograd keeps beyond the modelled tensors)")
    peak, reserved, device = (metrics.get(name) for name in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_device_bytes"))
    baseline_bytes = metrics.get("process_baseline_bytes")
    if peak is not None and baseline_bytes is not None and result.total is not None:
        found.append(f"peak allocated beyond the estimate: {_signed(peak - result.total + GPU_WORKSPACE - baseline_bytes)} "
                     "(dequantization buffers of a quantized base, kernels' scratch, what the model leaves out)")
    if reserved is not None and peak is not None:
        found.append(f"allocator cache: reserved - allocated = {_gib(reserved - peak)} (torch keeps freed blocks for reuse)")
    if device is not None and reserved is not None:
        found.append(f"CUDA context and other processes: NVML used - reserved = {_gib(device - reserved)} (outside torch's allocator)")
    return found


def _signed(value: int) -> str:
    return ("+" if value >= 0 else "-") + _gib(abs(value))


# --------------------------------------------------------------------------- the command line


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would exit 2
        raise EstimateError(f"{self.prog}: {message}")


MATRIX_OPTIONS = ("quant", "rank", "targets", "seq", "batch", "optimizer", "variant", "dropout")


def parser() -> argparse.ArgumentParser:
    estimating = Parser(prog="pytest-lora estimate", description=__doc__.splitlines()[0].strip("`"))
    estimating.add_argument("model", metavar="MODEL", nargs="?", help="a registry name, a config.json, a checkpoint directory or a .gguf file")
    estimating.add_argument("--quant", default="nf4", metavar="Q,...", help="formats of the base: " + ", ".join(QUANTIZATIONS))
    estimating.add_argument("--rank", default="16", metavar="R,...", help="LoRA ranks")
    estimating.add_argument("--targets", default="all-linear", metavar="T|...", help="all-linear, default or module names (q_proj,v_proj); sets separated by |")
    estimating.add_argument("--seq", default="2048", metavar="N,...", help="sequence lengths")
    estimating.add_argument("--batch", default="1", metavar="B,...", help="batch sizes")
    estimating.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    estimating.add_argument("--optimizer", default="adamw", metavar="O,...", help="optimizers: " + ", ".join(OPTIMIZERS))
    estimating.add_argument("--variant", default="lora", metavar="V,...", help="LoRA variants: " + ", ".join(VARIANTS))
    estimating.add_argument("--dropout", default="0", metavar="P,...", help="LoRA dropout (its mask and output are kept)")
    estimating.add_argument("--budget", metavar="SIZE", help="e.g. 24GiB: the largest batch that fits, with and without checkpointing")
    estimating.add_argument("--fit", default="batch", choices=["batch", "seq"], help="what --budget looks for: the batch at --seq, or the sequence at --batch")
    estimating.add_argument("--against", metavar="RUN.json", type=Path, help="a results file: each measured config beside its estimate")
    return estimating


def setups(arguments: argparse.Namespace) -> list[Setup]:
    """Every combination of the options' comma-separated values (targets: sets separated by |)."""
    import itertools

    values = {
        "quant": _items(arguments.quant, str),
        "rank": _items(arguments.rank, _whole, "--rank"),
        "targets": [_target_set(text) for text in arguments.targets.split("|")],
        "seq": _items(arguments.seq, _whole, "--seq"),
        "batch": _items(arguments.batch, _whole, "--batch"),
        "optimizer": _items(arguments.optimizer, str),
        "variant": _items(arguments.variant, str),
        "dropout": _items(arguments.dropout, _probability, "--dropout"),
    }
    combos = itertools.product(*(values[name] for name in MATRIX_OPTIONS))
    return [checked(Setup(grad_ckpt=arguments.grad_ckpt, **dict(zip(MATRIX_OPTIONS, combo)))) for combo in combos]


def _items(text: str, parse: Any, where: str = "") -> list[Any]:
    parts = [part.strip() for part in text.split(",")]
    return [parse(part, where) if where else parse(part) for part in parts]


def _whole(text: str, where: str) -> int:
    number = whole_number(text)
    if number is None or number < 1:
        raise EstimateError(f"{where}: {shown(text)} is not a whole number >= 1; allowed: e.g. {where} 16 or {where} 8,16")
    return number


def _probability(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise EstimateError(f"{where}: {shown(text)} is not a number; allowed: 0 <= p < 1, e.g. 0.05") from None


def _target_set(text: str) -> str | tuple[str, ...]:
    keyword = text.strip().lower()
    if keyword in TARGET_KEYWORDS:
        return keyword
    return tuple(name.strip() for name in text.split(",") if name.strip())


def main(argv: Sequence[str] | None = None) -> int:
    try:
        arguments = parser().parse_args(argv)
        if arguments.against is not None:
            print("\n".join(against_lines(arguments.against)))
            return 0
        if arguments.model is None:
            raise EstimateError("pytest-lora estimate: MODEL is missing; allowed: a registry name, a config.json, a checkpoint "
                                "directory or a .gguf file (or --against RUN.json)")
        budget = size_in_bytes(arguments.budget, "--budget") if arguments.budget is not None else None
        print(report(arguments.model, setups(arguments), budget, arguments.fit), end="")
        return 0
    except (EstimateError, RuleError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR


def report(model: str, configs: list[Setup], budget: int | None, vary: str) -> str:
    """The breakdown of one config, or the table of several; then each config's fit in ``budget``."""
    results = [estimate(model, setup) for setup in configs]
    first = results[0]
    lines = [f"{model} ({first.model_type}): {first.setup.describe()}" if len(results) == 1 else f"{model} ({first.model_type}):"]
    text = "\n".join(lines) + "\n"
    if len(results) == 1:
        text += render(None, breakdown(first), 1)
    else:
        varying = [name for name in MATRIX_OPTIONS if len({str(_shown_option(r.setup, name)) for r in results}) > 1]
        header, body = matrix_rows(results, varying)
        text += "GiB; " + first.setup.describe() + " unless the row says otherwise\n" + render(header, body, len(varying))
    text += f"how good: {first.fidelity}\n"
    if budget is not None:
        for result in results:
            if len(results) > 1:
                text += f"{result.setup.describe()}:\n"
            for ckpt in (False, True):
                text += "  " + fit_line(largest_fitting(model, replace(result.setup, grad_ckpt=ckpt), budget, vary)) + "\n"
    return text
