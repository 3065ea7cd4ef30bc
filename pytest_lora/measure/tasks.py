"""Synthetic languages a small model can really learn, made deterministically, with known optima.

A ``MarkovTask`` is a first-order Markov chain over the vocabulary: each token has ``branching``
likely successors with fixed probabilities (a random permutation per task, from its seed). A
model that has learnt the task predicts the next token with the chain's entropy rate as its loss,
and picks the most likely successor as often as that successor's probability; a uniform guess
costs ln V. A dialect (``rotation``) keeps a task's successors and rotates which of them is most
likely: a model that knows the task can learn the dialect with a small update, and learning it
costs the original task exactly what fine-tuning is said to cost: the old answers get less likely.

Losses here are the causal language-model loss: logits at position t predict token t + 1 (the
shift peft issue #3419 found missing in a forgetting measurement).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
from torch import nn

SUCCESSOR_PROBABILITIES = (0.55, 0.25, 0.15, 0.05)


@dataclass(frozen=True)
class MarkovTask:
    """Token t + 1 is one of ``branching`` successors of token t, drawn with fixed probabilities."""

    name: str
    vocab: int
    seed: int
    probabilities: tuple[float, ...] = SUCCESSOR_PROBABILITIES
    rotation: int = 0  # a dialect: the same successors as the task of this seed, probabilities rotated

    @cached_property
    def successors(self) -> torch.Tensor:
        """(vocab, branching) successor ids, the most likely first."""
        generator = torch.Generator().manual_seed(self.seed)
        successors = torch.stack([torch.randperm(self.vocab, generator=generator)[: len(self.probabilities)] for _ in range(self.vocab)])
        return successors.roll(self.rotation, dims=1)

    @cached_property
    def transition(self) -> torch.Tensor:
        """(vocab, vocab) next-token probabilities."""
        matrix = torch.zeros(self.vocab, self.vocab, dtype=torch.float64)
        matrix.scatter_(1, self.successors, torch.tensor(self.probabilities, dtype=torch.float64).expand(self.vocab, -1))
        return matrix

    @property
    def entropy(self) -> float:
        """Nats per token of an ideal predictor (every state has the same successor distribution)."""
        return -sum(p * math.log(p) for p in self.probabilities)

    @property
    def uniform_loss(self) -> float:
        return math.log(self.vocab)

    @property
    def best_accuracy(self) -> float:
        return max(self.probabilities)

    def sampler(self, batch: int, seq_len: int) -> Callable[[torch.Generator], torch.Tensor]:
        """Batches of this task for ``train``."""
        return lambda generator: self.sample(batch, seq_len, generator)

    def sample(self, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """``batch`` sequences of ``seq_len`` tokens, starting from uniform random tokens."""
        ids = torch.empty(batch, seq_len, dtype=torch.long)
        ids[:, 0] = torch.randint(0, self.vocab, (batch,), generator=generator)
        choice = torch.multinomial(torch.tensor(self.probabilities).expand(batch * (seq_len - 1), -1), 1, generator=generator)
        choice = choice.view(batch, seq_len - 1)
        for t in range(1, seq_len):
            ids[:, t] = self.successors[ids[:, t - 1], choice[:, t - 1]]
        return ids


def causal_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t + 1 from the logits at t (float32)."""
    return nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def next_token_accuracy(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float((logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean())


EVAL_BATCH = 8  # sequences a forward pass: a held-out set of any size is evaluated in bounded memory


@torch.no_grad()
def evaluate(model: nn.Module, ids: torch.Tensor, exact_match: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
             with_exact: bool = False):
    """Held-out causal loss and next-token accuracy of ``model`` on ``ids`` (eval mode), in batches
    of ``EVAL_BATCH`` sequences, each weighted by its predicted tokens; with ``with_exact``, also
    ``exact_match(logits, ids)`` averaged over the batches (``None`` without one)."""
    was_training = model.training
    model.eval()
    loss = correct = exact = 0.0
    for start in range(0, len(ids), EVAL_BATCH):
        part = ids[start:start + EVAL_BATCH]
        logits = model(input_ids=part).logits
        share = len(part) / len(ids)
        loss += causal_loss(logits, part).item() * share
        correct += next_token_accuracy(logits, part) * share
        if exact_match is not None:
            exact += exact_match(logits, part) * share
    model.train(was_training)
    if with_exact:
        return loss, correct, exact if exact_match is not None else None
    return loss, correct


def train(model: nn.Module, sample: Callable[[torch.Generator], torch.Tensor], steps: int, *, lr: float, seed: int, device: str,
          on_step: Callable[[int], None] = lambda done: None) -> list[float]:
    """AdamW on the causal loss over the trainable parameters, one ``sample(generator)`` batch per
    step; returns the loss of each step. ``on_step(done)`` follows each step (a progress line)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        ids = sample(generator).to(device)
        loss = causal_loss(model(input_ids=ids).logits, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        on_step(len(losses))
    return losses
