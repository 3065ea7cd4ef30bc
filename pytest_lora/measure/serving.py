"""Serving a LoRA adapter: latency of a prompt and of each generated token, mixed-adapter batches,
and the adapter's file.

Latency is measured as a serving stack sees it: a forward pass over the prompt that fills the KV
cache (prefill), then one forward pass per generated token that reads and extends it (decode),
greedy, for ``new_tokens`` tokens. An encoder-decoder model encodes the prompt and decodes from
its start token. Every variant of a model (the base, the unmerged adapter, each merged model) is
timed on the very same token ids, so that their differences are the variants'.

The adapter file is safetensors: an 8-byte little-endian header length, a JSON header naming
each tensor's dtype, shape and byte range, then the tensors' bytes. ``safetensors_layout`` reads
that layout from the bytes, independently of the safetensors library.
"""

from __future__ import annotations

import inspect
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def prompt_ids(vocab_size: int, batch: int, prompt_len: int, device: str | torch.device, seed: int) -> torch.Tensor:
    """``batch`` prompts of ``prompt_len`` random token ids, drawn from a generator seeded by the caller."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, prompt_len), generator=generator).to(device)


def _decoder_start(model: nn.Module, batch: int, device: torch.device) -> torch.Tensor:
    config = model.config
    start = getattr(config, "decoder_start_token_id", None)
    start = 0 if start is None else start
    return torch.full((batch, 1), start, dtype=torch.long, device=device)


class Generation:
    """Greedy generation with the KV cache, step by step, so that each step can be timed.

    ``prefill()`` runs the prompt; ``decode()`` one token. ``forward_kwargs`` are passed to every
    forward (peft's ``adapter_names`` for a mixed batch).
    """

    def __init__(self, model: nn.Module, ids: torch.Tensor, **forward_kwargs: Any):
        self.model, self.ids, self.kwargs = model, ids, forward_kwargs
        config = getattr(model, "config", None)
        self.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        self.cache_keyword = cache_keyword(model)
        self.cache: Any = None
        self.encoder: Any = None
        self.next_token: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def prefill(self) -> None:
        if self.encoder_decoder:
            start = _decoder_start(self.model, self.ids.shape[0], self.ids.device)
            output = self.model(input_ids=self.ids, decoder_input_ids=start, use_cache=True, **self.kwargs)
            self.encoder = (output.encoder_last_hidden_state,)
        else:
            output = self.model(input_ids=self.ids, use_cache=True, **self.kwargs)
        self._take(output)

    def decode(self) -> None:
        if self.encoder_decoder:
            output = self.model(encoder_outputs=self.encoder, decoder_input_ids=self.next_token, use_cache=True,
                                **{self.cache_keyword: self.cache}, **self.kwargs)
        else:
            output = self.model(input_ids=self.next_token, use_cache=True, **{self.cache_keyword: self.cache}, **self.kwargs)
        self._take(output)

    def _take(self, output: Any) -> None:
        self.logits = output.logits[:, -1]
        self.cache = getattr(output, self.cache_keyword)
        self.next_token = self.logits.argmax(dim=-1, keepdim=True)


def cache_keyword(model: nn.Module) -> str:
    """The name of the KV cache in a forward's arguments and outputs: ``cache`` since transformers
    5.2x, ``past_key_values`` before (still accepted, with a deprecation warning)."""
    plain = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(plain.forward).parameters else "past_key_values"


@dataclass
class Latency:
    """Seconds of each prefill and each decoded token, over the timed rounds."""

    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)


@torch.no_grad()
def latency(model: nn.Module, ids: torch.Tensor, new_tokens: int, timer_factory: Callable[[], Any], warmup: int, rounds: int,
            **forward_kwargs: Any) -> Latency:
    """Time ``warmup`` + ``rounds`` generations of ``new_tokens`` tokens from ``ids``; the warm-up
    ones are dropped. ``timer_factory`` gives a ``timing.StepTimer`` (CUDA events on a GPU)."""
    prefill, decode = timer_factory(), timer_factory()
    result = Latency()
    for round_index in range(warmup + rounds):
        generation = Generation(model, ids, **forward_kwargs)
        prefill.time(generation.prefill)
        for _ in range(new_tokens):
            decode.time(generation.decode)
        if round_index >= warmup:
            result.prefill.append(prefill.times[-1])
            result.decode.extend(decode.times[-new_tokens:])
    return result


@torch.no_grad()
def last_logits(model: nn.Module, ids: torch.Tensor, **forward_kwargs: Any) -> torch.Tensor:
    """The logits of the prompt's last position (the first generated token's), in the model's dtype."""
    generation = Generation(model, ids, **forward_kwargs)
    generation.prefill()
    return generation.logits


def overhead_pct(value: float, reference: float) -> float:
    """peft's definition: how much slower than the reference, in % of it."""
    return 100.0 * (value - reference) / reference


# --------------------------------------------------------------------------- mixed batches


def rows_per_adapter(adapters: int, batch: int) -> list[int]:
    """Which adapter each row of a mixed batch uses: at least ``batch`` rows and one row per
    adapter, round robin, so that every adapter serves the same number of rows."""
    rows = max(batch, adapters)
    rows += -rows % adapters
    return [row % adapters for row in range(rows)]


@dataclass(frozen=True)
class MixedBatchCheck:
    """A mixed batch's logits against each adapter run alone over the whole batch."""

    max_abs_err: float  # largest |mixed - alone| over the rows of each adapter
    separation: float  # smallest max |alone_a - alone_b| over pairs of outputs: what a misrouted row would show
    wrong_rows: list[int]  # rows closer to another output than to their own adapter's
    beyond_rounding: list[int]  # rows whose error exceeds the rounding of the logits' dtype


ROUNDING_ULPS = 4  # the rows of a mixed batch go through other kernels' shapes: a few roundings apart
PEFT_ATOL = 3e-5  # peft's own tests of mixed batches (4-bit, on a GPU): the floor in float32
NOISE_FACTOR = 2  # a mixed batch may differ from its adapter alone twice as much as a change of batch shape does


def check_mixed_batch(mixed: torch.Tensor, alone: dict[str, torch.Tensor], assignment: list[str], noise_floor: float = 0.0) -> MixedBatchCheck:
    """Row ``i`` of ``mixed`` used adapter ``assignment[i]``: it must equal that adapter's own
    output for the row up to the rounding of the computation, and be nearer to it than to any
    other output of ``alone`` (the other adapters', and the base's, which a row that lost its
    adapter would show).

    The rounding: a few roundings of the logits' dtype (``ROUNDING_ULPS`` x eps x the row's
    largest logit, at least peft's 3e-5), or ``NOISE_FACTOR`` times ``noise_floor``, whichever is
    larger. ``noise_floor`` is measured (``batch_shape_noise``): how far the same adapter's logits
    move when a row is run alone instead of in the batch. peft computes a mixed batch's LoRA terms
    on each adapter's sub-batch, other matrix shapes whose roundings differ in every layer; in
    half precision through SmolLM2's 30 layers that is up to a logit (0.125 in fp16, 1.1 in bf16),
    while its adapters' outputs lie 3.6 to 6.3 apart."""
    eps = torch.finfo(mixed.dtype).eps
    mixed, alone = mixed.float(), {name: output.float() for name, output in alone.items()}
    errors, wrong, beyond = [], [], []
    for row, own_name in enumerate(assignment):
        distances = {name: (mixed[row] - output[row]).abs().max().item() for name, output in alone.items()}
        own = distances[own_name]
        errors.append(own)
        if any(distance <= own for name, distance in distances.items() if name != own_name):
            wrong.append(row)
        if own > max(ROUNDING_ULPS * eps * alone[own_name][row].abs().max().item(), NOISE_FACTOR * noise_floor, PEFT_ATOL):
            beyond.append(row)
    names = list(alone)
    separation = min((alone[a] - alone[b]).abs().amax(dim=-1).min().item() for i, a in enumerate(names) for b in names[i + 1:])
    return MixedBatchCheck(max(errors), separation, wrong, beyond)


def batch_shape_noise(model: nn.Module, ids: torch.Tensor, alone: dict[str, torch.Tensor], assignment: list[str]) -> float:
    """The largest change of a row's logits when its adapter runs it alone (a batch of one)
    instead of in the whole batch: the rounding noise of a change of matrix shapes, the scale a
    mixed batch's differences are read against. Leaves the last adapter of ``assignment`` active."""
    noise = 0.0
    for row, name in enumerate(assignment):
        model.set_adapter(name)
        single = last_logits(model, ids[row:row + 1]).float()
        noise = max(noise, (single[0] - alone[name][row].float()).abs().max().item())
    return noise


def mixed_path_noise(model: nn.Module, ids: torch.Tensor, alone: dict[str, torch.Tensor], names: list[str]) -> float:
    """The largest change of an adapter's logits when every row of the batch goes through peft's
    mixed-batch path routed to that one adapter: what the mixed path computes differently with no
    routing to get wrong. peft rounds each adapter's LoRA term to the result's dtype before adding
    it there (``result[rows] += lora_output.to(torch_result_dtype)``, peft 0.21.2
    tuners/lora/layer.py:883), where a plain forward adds the float32 term and rounds once
    (``result = result + lora_B(lora_A(dropout(x))) * scaling``, line 1102): in bf16 through
    SmolLM2's 30 layers that is 1.1 logits, while a batch of one matches the batch exactly on
    some CPUs (``batch_shape_noise`` 0). Leaves the last of ``names`` active."""
    noise = 0.0
    for name in names:
        model.set_adapter(name)
        routed = last_logits(model, ids, adapter_names=[name] * len(ids)).float()
        noise = max(noise, (routed - alone[name].float()).abs().max().item())
    return noise


def adapter_bytes(model: nn.Module, names: list[str]) -> int:
    """Bytes of the LoRA tensors of the named adapters held by ``model`` (each storage once)."""
    seen: dict[tuple[str, int], int] = {}
    for module in model.modules():
        for attribute in ("lora_A", "lora_B", "lora_magnitude_vector"):
            holder = getattr(module, attribute, None)
            if not isinstance(holder, nn.ModuleDict):
                continue
            for name in names:
                if name in holder:
                    for tensor in holder[name].parameters():
                        seen[(tensor.device.type, tensor.data_ptr())] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


# --------------------------------------------------------------------------- the adapter's file


@dataclass(frozen=True)
class SafetensorsLayout:
    """What a safetensors file holds, read from its bytes."""

    file_bytes: int
    header_bytes: int  # the 8-byte length and the JSON header
    tensors: int
    elements: int
    data_bytes: int  # the tensors' bytes, from each tensor's dtype and shape
    dtypes: frozenset[str]
    contiguous: bool  # the byte ranges tile the data section exactly


def safetensors_layout(path: Path) -> SafetensorsLayout:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header.pop("__metadata__", None)
    elements = data = 0
    ranges = []
    for entry in header.values():
        count = 1
        for size in entry["shape"]:
            count *= size
        elements += count
        data += count * SAFETENSORS_DTYPE_BYTES[entry["dtype"]]
        ranges.append(tuple(entry["data_offsets"]))
    ranges.sort()
    tiles = all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])) and (not ranges or (ranges[0][0] == 0 and ranges[-1][1] == data))
    return SafetensorsLayout(len(raw), 8 + length, len(header), elements, data,
                             frozenset(entry["dtype"] for entry in header.values()), tiles)
