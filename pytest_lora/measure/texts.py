"""Real text for a pretrained model, with nothing downloaded: an old skill it has, a new one it lacks.

The old skill is English prose about programming: the reference text every CPython ships in
``pydoc_data.topics`` (the help topics of the language reference, 465,000 characters, about
114,000 SmolLM2 tokens). It is on every machine Python runs on, is the kind of text a model
pretrained on web text and code has read (SmolLM2-135M: 3.9 nats at 64 tokens, against 10.8
for a uniform guess over its vocabulary), and is not changed by anything here: forgetting is the
rise of the held-out loss on it.

The new skill is a task the model does not have and whose learning reads as exact-match
accuracy as well as loss: two-digit addition written as ``07+25=032`` with a newline, every
operand and sum zero-padded, so that every problem is the same number of tokens and its answer
sits at known positions. The 10,000 operand pairs are split by a fixed seed into problems to
train on and held-out problems; an answer counts as right when every one of its tokens (the
three digits and the newline) is the model's top prediction given what precedes it, which is
what greedy decoding of the answer would produce.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from ..models import registry

SPLIT_SEED = 20_241  # the held-out sets are fixed: the same problems and blocks for every seed and run
HELD_OUT_PROBLEMS = 192  # 32 blocks of six problems: exact match in steps of 1/192


def reference_prose() -> list[str]:
    """The help topics of CPython's ``pydoc_data``, in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def prose_blocks(tokenizer: Any, seq_len: int, count: int | None) -> torch.Tensor:
    """``count`` blocks of ``seq_len`` tokens of the prose (all of them for ``None``), drawn without
    replacement by the fixed split seed from all of it (tokenised once, concatenated, cut)."""
    ids: list[int] = []
    for text in reference_prose():
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    cut = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    chosen = torch.randperm(len(cut), generator=torch.Generator().manual_seed(SPLIT_SEED))[:count]
    return cut[chosen.sort().values]


def text_ids(model: Any, batch: int, seq_len: int, seed: int) -> torch.Tensor | None:
    """``batch`` blocks of the prose as the model's tokenizer reads it, chosen by ``seed``: what a
    merge or a served prompt is measured on when the model reads text (a checkpoint with a
    tokenizer); ``None`` for a model without one, which is measured on random token ids."""
    if model.kind != "checkpoint" or not registry.has_tokenizer(model.path):
        return None
    every = _all_prose_blocks(model.path, seq_len)
    chosen = torch.randperm(len(every), generator=torch.Generator().manual_seed(seed))[:batch]
    return every[chosen]


@functools.lru_cache(maxsize=4)
def _all_prose_blocks(path: str, seq_len: int) -> torch.Tensor:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return prose_blocks(tokenizer, seq_len, count=None)


@dataclass(frozen=True)
class Addition:
    """Zero-padded two-digit addition, tokenised problem by problem with the model's tokenizer."""

    tokens: dict[tuple[int, int], list[int]]  # (a, b) -> the problem's tokens
    answer_len: int  # tokens of "ccc\n", at the end of every problem
    train_pairs: list[tuple[int, int]]
    held_out_pairs: list[tuple[int, int]]

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> Addition:
        pairs = [(a, b) for a in range(100) for b in range(100)]
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
        held_out = sorted(pairs[i] for i in order[:HELD_OUT_PROBLEMS])
        train = sorted(pairs[i] for i in order[HELD_OUT_PROBLEMS:])
        tokens = {(a, b): tokenizer(problem(a, b), add_special_tokens=False)["input_ids"] for a, b in pairs}
        lengths = {len(ids) for ids in tokens.values()}
        answer = {len(tokenizer(f"{c:03d}\n", add_special_tokens=False)["input_ids"]) for c in range(199)}
        if len(lengths) != 1 or len(answer) != 1:
            raise ValueError(f"the tokenizer splits the problems into {sorted(lengths)} tokens and the answers into {sorted(answer)}: "
                             "the addition task needs one length each (a tokenizer that writes each digit as a token)")
        return cls(tokens, answer.pop(), train, held_out)

    @property
    def problem_len(self) -> int:
        return len(next(iter(self.tokens.values())))

    def per_block(self, seq_len: int) -> int:
        return max(1, seq_len // self.problem_len)

    def blocks(self, pairs: list[tuple[int, int]], seq_len: int) -> torch.Tensor:
        """The problems of ``pairs``, ``per_block(seq_len)`` to a block (a remainder left out)."""
        per = self.per_block(seq_len)
        count = len(pairs) // per
        return torch.tensor([[t for pair in pairs[i * per:(i + 1) * per] for t in self.tokens[pair]] for i in range(count)])

    def sampler(self, batch: int, seq_len: int):
        """Training batches: problems drawn from the training pairs by the run's generator."""
        per = self.per_block(seq_len)

        def sample(generator: torch.Generator) -> torch.Tensor:
            drawn = torch.randint(0, len(self.train_pairs), (batch * per,), generator=generator).tolist()
            return self.blocks([self.train_pairs[i] for i in drawn], seq_len)

        return sample

    def exact_match(self, logits: torch.Tensor, ids: torch.Tensor) -> float:
        """The share of problems in ``ids`` whose every answer token is the top prediction."""
        predicted = logits[:, :-1].argmax(-1) == ids[:, 1:]  # position t predicts t + 1
        length, answer = self.problem_len, self.answer_len
        right = []
        for start in range(0, ids.shape[1] - length + 1, length):
            # the answer's tokens sit at start + length - answer .. start + length - 1; each is predicted one position earlier
            span = predicted[:, start + length - answer - 1: start + length - 1]
            right.append(span.all(-1))
        return float(torch.stack(right, -1).float().mean())


def problem(a: int, b: int) -> str:
    return f"{a:02d}+{b:02d}={a + b:03d}\n"
