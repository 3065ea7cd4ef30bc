"""Forgetting and learning: what fine-tuning on task B costs on task A, for LoRA and full fine-tuning.

Following peft's method_comparison and Biderman et al. 2024 ("LoRA Learns Less and Forgets
Less"): forgetting is the held-out causal loss on A after fine-tuning minus before, learning is
the held-out loss on B before minus after. "Before" is the base itself (peft #3419 found it taken
from a model that wasn't the base), and the loss is shifted (position t predicts t + 1).

LoRA and full fine-tuning get a matched budget: the same steps, batches, tokens, optimizer
(AdamW) and learning rate. Every run starts from the same base weights and is repeated with
several seeds (batches and adapter initialisation), so that the difference between the methods
comes with a spread.

An experiment is either synthetic (a small model trained on a Markov language A, task B its
dialect) or the user's: a local checkpoint, text to forget and text to learn, tokenised with the
checkpoint's own tokenizer.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import peft
import torch
from torch import nn

from ..models import build, registry
from . import tasks


@dataclass
class Experiment:
    """Everything a run needs: how to rebuild the base, held-out sets, and how to draw B batches."""

    name: str
    make_base: Callable[[], nn.Module]
    forget_eval: torch.Tensor
    learn_eval: torch.Tensor
    learn_batches: Callable[[torch.Generator], torch.Tensor]
    facts: dict[str, float] = field(default_factory=dict)  # what is known of the tasks (entropy, ...)
    before: tuple[float, float] | None = None  # the base's held-out losses, measured once
    steps: int = 60
    lora_lr: float = 1e-3
    full_lrs: tuple[float, float] = (1e-3, 1e-4)  # full fine-tuning at LoRA's learning rate and ten times lower
    exact_match: Callable[[torch.Tensor, torch.Tensor], float] | None = None  # the new task read as answers (logits, ids)
    exact_before: float | None = None


@dataclass(frozen=True)
class Outcome:
    """Held-out losses and accuracies on the forget (A) and learn (B) sets, before and after."""

    forget_before: float
    forget_after: float
    learn_before: float
    learn_after: float
    forget_accuracy_after: float
    learn_accuracy_after: float
    learn_exact_after: float | None = None  # exact-match accuracy of the new task's answers, where it has them

    @property
    def forgetting(self) -> float:
        return self.forget_after - self.forget_before

    @property
    def learning(self) -> float:
        return self.learn_before - self.learn_after


    @property
    def diverged(self) -> bool:
        """The fine-tune made the new task worse: a run no comparison should take as its reference."""
        return self.learning < 0


def measure(model: nn.Module, experiment: Experiment, before: tuple[float, float]) -> Outcome:
    forget_loss, forget_accuracy = tasks.evaluate(model, experiment.forget_eval)
    learn_loss, learn_accuracy, exact = tasks.evaluate(model, experiment.learn_eval, experiment.exact_match, with_exact=True)
    return Outcome(before[0], forget_loss, before[1], learn_loss, forget_accuracy, learn_accuracy, exact)


def baseline(experiment: Experiment) -> tuple[float, float]:
    """Held-out losses of the base itself on the forget and learn sets (and its exact match)."""
    base = experiment.make_base()
    learn_loss, _, experiment.exact_before = tasks.evaluate(base, experiment.learn_eval, experiment.exact_match, with_exact=True)
    return tasks.evaluate(base, experiment.forget_eval)[0], learn_loss


@dataclass(frozen=True)
class LoraRun:
    outcome: Outcome
    adapter_off_is_base: bool
    base_unchanged: bool


def run_lora(experiment: Experiment, lora_config: peft.LoraConfig, seed: int, steps: int, lr: float, device: str) -> LoraRun:
    """Fine-tune a fresh base with LoRA on B; also check that the base underneath is untouched."""
    torch.manual_seed(seed)
    base = experiment.make_base()
    base.eval()
    probe = experiment.forget_eval[: tasks.EVAL_BATCH]  # a batch of held-out text: its logits are kept for the adapter-off check
    with torch.no_grad():
        base_logits = base(input_ids=probe).logits
    weights = {name: value.detach().clone() for name, value in base.state_dict().items()}
    model = peft.get_peft_model(base, lora_config)
    tasks.train(model, experiment.learn_batches, steps, lr=lr, seed=seed, device=device)
    outcome = measure(model, experiment, baseline_of(experiment))
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        adapter_off = torch.equal(model(input_ids=probe).logits, base_logits)
    after = {name.replace(".base_layer", ""): value for name, value in model.get_base_model().state_dict().items() if "lora_" not in name}
    unchanged = after.keys() == weights.keys() and all(torch.equal(after[name], value) for name, value in weights.items())
    return LoraRun(outcome, adapter_off, unchanged)


def run_full(experiment: Experiment, seed: int, steps: int, lr: float, device: str) -> Outcome:
    """Fine-tune every weight of a fresh base on B with the same budget."""
    torch.manual_seed(seed)
    model = experiment.make_base()
    model.requires_grad_(True)
    tasks.train(model, experiment.learn_batches, steps, lr=lr, seed=seed, device=device)
    return measure(model, experiment, baseline_of(experiment))


def baseline_of(experiment: Experiment) -> tuple[float, float]:
    """The base's held-out losses, computed once per experiment."""
    if experiment.before is None:
        experiment.before = baseline(experiment)
    return experiment.before


def reference_lr(full: dict[float, list[Outcome]]) -> float | None:
    """The learning rate of full fine-tuning that LoRA is compared with: the one that learnt the
    new task most, among those no seed of which diverged; ``None`` when every one diverged."""
    usable = {lr: outcomes for lr, outcomes in full.items() if outcomes and not any(o.diverged for o in outcomes)}
    if not usable:
        return None
    return max(usable, key=lambda lr: statistics.fmean(o.learning for o in usable[lr]))


def summary(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# --------------------------------------------------------------------------- experiments


def synthetic_experiment(config: dict[str, Any], state: dict[str, torch.Tensor], task_a: tasks.MarkovTask, task_b: tasks.MarkovTask,
                         device: str, batch: int = 16, seq_len: int = 64, held_out: int = 32) -> Experiment:
    """A base trained on Markov language A; B is A's dialect; held-out sets drawn with their own seeds."""

    def make_base() -> nn.Module:
        model = build.instantiate(config, device, torch.float32)
        model.load_state_dict(state)
        return model

    forget_eval = task_a.sample(held_out, seq_len, torch.Generator().manual_seed(10_001)).to(device)
    learn_eval = task_b.sample(held_out, seq_len, torch.Generator().manual_seed(10_002)).to(device)
    facts = {"entropy": task_a.entropy, "uniform_loss": task_a.uniform_loss, "best_accuracy": task_a.best_accuracy}
    return Experiment(f"{task_a.name} -> {task_b.name}", make_base, forget_eval, learn_eval, task_b.sampler(batch, seq_len), facts)


# A pretrained model on real text (``measure.texts``): SmolLM2-135M's LoRA step of 8 x 64 tokens
# takes 1.3 to 1.5 s on 2 CPU cores and its full step 2.1 s; 30 of them a run made eight runs (two
# LoRA specs and two learning rates of full fine-tuning, two seeds each) take nine minutes, and
# `make bench-real` 23. 20 steps of 6 x 64 tokens halved that on a 2-core Xeon; a 2-core EPYC
# takes twice as long, and 4 x 64 tokens keep the eight runs near six minutes there, while LoRA
# still learns addition (exact match from 3% to the tens of percent). A
# pretrained model takes lower learning rates than a model trained from scratch: full
# fine-tuning at 1e-3 wrecked SmolLM2 (learning -0.05, forgetting 2.3 nats); LoRA's best rate is
# about ten times full fine-tuning's (Schulman et al., "LoRA Without Regret", 2025).
REAL_STEPS, REAL_BATCH, REAL_SEQ_LEN, REAL_PROSE_BLOCKS = 20, 4, 64, 16
REAL_LORA_LR, REAL_FULL_LRS = 1e-3, (1e-4, 1e-5)


def with_budget(experiment: Experiment, **budget: Any) -> Experiment:
    """The experiment with the steps and learning rates the user chose (``steps``, ``lora_lr``,
    ``full_lrs``); the rest as it was."""
    for name, value in budget.items():
        setattr(experiment, name, value)
    return experiment


def real_text_experiment(checkpoint: str, device: str, name: str, batch: int = REAL_BATCH, seq_len: int = REAL_SEQ_LEN) -> Experiment:
    """A pretrained checkpoint: the old skill is CPython's reference prose, the new one
    zero-padded addition (``measure.texts``), both tokenised with the checkpoint's tokenizer."""
    import transformers

    from . import texts

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    addition = texts.Addition.for_tokenizer(tokenizer)
    forget = texts.prose_blocks(tokenizer, seq_len, REAL_PROSE_BLOCKS).to(device)
    learn_eval = addition.blocks(addition.held_out_pairs, seq_len).to(device)
    config_dict = registry.load_config_dict(checkpoint)
    cls = build.model_class(config_dict)

    def make_base() -> nn.Module:
        return cls.from_pretrained(checkpoint, dtype=torch.float32, device_map={"": device})

    vocab = config_dict.get("vocab_size") or len(tokenizer)
    facts = {"uniform_loss": math.log(vocab), "exact_match_chance": 0.0}
    return Experiment(f"{name}: Python's reference prose -> two-digit addition", make_base, forget, learn_eval,
                      addition.sampler(batch, seq_len), facts, steps=REAL_STEPS, lora_lr=REAL_LORA_LR,
                      full_lrs=REAL_FULL_LRS, exact_match=addition.exact_match)


DATA_SEQ_LEN = 64  # tokens per block of the user's data
LEARN_BLOCKS = 2  # the fewest learn blocks: the held-out tenth (at least one) and a training block apart


class DataProblem(ValueError):
    """A data file the experiment cannot use; the message says why, ``path`` which file (once known)."""

    path: Path | None = None


def read_texts(path: Path) -> list[str]:
    """A JSONL file's ``text`` fields, or a text file's paragraphs (separated by blank lines)."""
    try:
        content = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataProblem(f"is not UTF-8 text (byte {error.start}: {error.reason}; a binary file?)") from None
    if Path(path).suffix == ".jsonl":
        texts = [_jsonl_text(line, number) for number, line in enumerate(content.splitlines(), 1) if line.strip()]
    else:
        texts = [part.strip() for part in content.split("\n\n") if part.strip()]
    if not texts:
        raise DataProblem("holds no text")
    return texts


def _jsonl_text(line: str, number: int) -> str:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataProblem(f"line {number} is not JSON ({error.msg})") from None
    if not isinstance(item, dict) or not isinstance(item.get("text"), str):
        raise DataProblem(f'line {number} has no "text" string (one JSON object per line with a "text" field is allowed)')
    return item["text"]


def blocks(tokenizer: Any, texts: list[str], seq_len: int, minimum: int = 1) -> torch.Tensor:
    """The texts tokenised, concatenated and cut into ``seq_len`` token blocks, at least ``minimum``."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
    count = len(ids) // seq_len
    if count < minimum:
        wanted = "one block" if minimum == 1 else f"{minimum} blocks"
        raise DataProblem(f"{len(ids)} tokens: too few for {wanted} of {seq_len}")
    return torch.tensor(ids[: count * seq_len]).view(count, seq_len)


def data_blocks(checkpoint: str, forget_path: Path, learn_path: Path, seq_len: int = DATA_SEQ_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """The forget file's blocks (one at least) and the learn file's (two at least: with one, the
    held-out set would be the training set), tokenised with the checkpoint's tokenizer; a
    ``DataProblem`` names the file. Kept per process: the session's check before the run and the
    experiment read the files once (callers copy what they move or change)."""
    return _data_blocks(str(checkpoint), Path(forget_path), Path(learn_path), int(seq_len))


@functools.lru_cache(maxsize=4)
def _data_blocks(checkpoint: str, forget_path: Path, learn_path: Path, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    found = []
    for path, minimum in ((forget_path, 1), (learn_path, LEARN_BLOCKS)):
        try:
            found.append(blocks(tokenizer, read_texts(path), seq_len, minimum))
        except DataProblem as problem:
            problem.path = Path(path)
            raise
    return found[0], found[1]


def data_experiment(checkpoint: str, forget_path: Path, learn_path: Path, device: str, batch: int = 8,
                    seq_len: int = DATA_SEQ_LEN) -> Experiment:
    """The user's checkpoint; held-out loss on the forget text; learn text split 90 / 10."""
    forget, learn = data_blocks(checkpoint, forget_path, learn_path, seq_len)
    forget = forget.to(device)
    cut = max(1, len(learn) // 10)
    train, learn_eval = learn[cut:], learn[:cut].to(device)
    config_dict = registry.load_config_dict(checkpoint)
    cls = build.model_class(config_dict)

    def make_base() -> nn.Module:
        return cls.from_pretrained(checkpoint, dtype=torch.float32, device_map={"": device})

    def learn_batches(generator: torch.Generator) -> torch.Tensor:
        return train[torch.randint(0, len(train), (batch,), generator=generator)]

    return Experiment(f"{Path(forget_path).name} -> {Path(learn_path).name}", make_base, forget, learn_eval, learn_batches)
