"""Real text for a pretrained base (``measure.texts``) and the parts of the forgetting experiment
it needs, against hand computations, with a character tokenizer (every character a token, as
SmolLM2's tokenizer writes digits): the addition task's problems, split and exact match; the
prose blocks; evaluation in batches; the reference learning rate; which checkpoint reads text."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pytest_lora import data
from pytest_lora.models import build, registry
from pytest_lora.measure import forgetting, tasks, texts
from pytest_lora.specs import ModelSpec


class Characters:
    """A tokenizer whose tokens are the characters' code points."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) for c in text]}


def test_addition_problems_are_one_length_split_once_and_held_out():
    addition = texts.Addition.for_tokenizer(Characters())
    assert texts.problem(7, 25) == "07+25=032\n"
    assert (addition.problem_len, addition.answer_len) == (10, 4)
    assert len(addition.held_out_pairs) == texts.HELD_OUT_PROBLEMS and len(addition.train_pairs) == 10_000 - texts.HELD_OUT_PROBLEMS
    assert not set(addition.held_out_pairs) & set(addition.train_pairs)
    assert addition.held_out_pairs == texts.Addition.for_tokenizer(Characters()).held_out_pairs  # fixed by its seed
    blocks = addition.blocks(addition.held_out_pairs, 64)
    assert blocks.shape == (texts.HELD_OUT_PROBLEMS // 6, 60)  # six problems of ten tokens a block
    a, b = addition.held_out_pairs[0]
    assert "".join(map(chr, blocks[0, :10].tolist())) == texts.problem(a, b)
    drawn = addition.sampler(3, 64)(torch.Generator().manual_seed(0))
    assert drawn.shape == (3, 60)
    train = {texts.problem(*pair) for pair in addition.train_pairs}
    assert all("".join(map(chr, row[i:i + 10].tolist())) in train for row in drawn for i in range(0, 60, 10))


def test_a_tokenizer_that_merges_digits_is_refused():
    class Merging(Characters):
        def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
            return {"input_ids": [ord(c) for c in text.replace("00", "\x00")]}  # "00" one token: lengths differ

    with pytest.raises(ValueError, match="the addition task needs one length each"):
        texts.Addition.for_tokenizer(Merging())


def test_exact_match_counts_a_problem_right_only_when_every_answer_token_is():
    addition = texts.Addition.for_tokenizer(Characters())
    ids = addition.blocks([(7, 25), (1, 2)], 20)  # one block of two problems
    vocab = 128
    logits = torch.zeros(1, 20, vocab)
    logits[0, torch.arange(19), ids[0, 1:]] = 1.0  # every next token predicted
    assert addition.exact_match(logits, ids) == 1.0
    logits[0, 3, :] = 0  # position 3 predicts the "+" of the first problem: not an answer token
    logits[0, 3, ord("x")] = 1.0
    assert addition.exact_match(logits, ids) == 1.0
    logits[0, 17, :] = 0  # position 17 predicts the second problem's answer digit at 18
    logits[0, 17, ord("9")] = 2.0
    assert addition.exact_match(logits, ids) == 0.5


def test_the_prose_is_cpython_s_reference_in_fixed_blocks():
    prose = texts.reference_prose()
    assert len(prose) > 50 and sum(map(len, prose)) > 100_000
    blocks = texts.prose_blocks(Characters(), 64, 16)
    assert blocks.shape == (16, 64) and torch.equal(blocks, texts.prose_blocks(Characters(), 64, 16))
    assert "".join(map(chr, blocks[0].tolist())) in "".join(prose)


def test_evaluation_in_batches_equals_one_pass():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50))

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids):
            return type("Out", (), {"logits": self.inner(input_ids)})

    ids = torch.randint(0, 50, (3 * tasks.EVAL_BATCH + 1, 12))
    with torch.no_grad():
        logits = model(ids)
    loss, accuracy = tasks.evaluate(Wrapped(), ids)
    assert loss == pytest.approx(tasks.causal_loss(logits, ids).item(), rel=1e-6)
    assert accuracy == pytest.approx(tasks.next_token_accuracy(logits, ids), rel=1e-6)
    assert tasks.evaluate(Wrapped(), ids, with_exact=True)[2] is None


def outcome(learning: float) -> forgetting.Outcome:
    return forgetting.Outcome(1.0, 1.1, 2.0, 2.0 - learning, 0.5, 0.5)


def test_the_reference_is_the_learning_rate_that_learnt_most_without_diverging():
    assert forgetting.reference_lr({1e-4: [outcome(0.8), outcome(0.9)], 1e-5: [outcome(0.7)]}) == 1e-4
    assert forgetting.reference_lr({1e-3: [outcome(0.9), outcome(-0.1)], 1e-4: [outcome(0.5)]}) == 1e-4  # one seed diverged
    assert forgetting.reference_lr({1e-3: [outcome(-0.05)]}) is None
    assert outcome(-0.05).diverged and not outcome(0.0).diverged


def test_the_first_checkpoint_with_a_tokenizer_reads_real_text(tmp_path):
    weights_only, pretrained = tmp_path / "weights", tmp_path / "pretrained"
    for directory in (weights_only, pretrained):
        directory.mkdir()
    (pretrained / "tokenizer.json").write_text("{}")
    matrix = type("M", (), {"models": [ModelSpec("llama-3.2-1b-tiny", "registry", "x"), ModelSpec("w", "checkpoint", str(weights_only)),
                                       ModelSpec("p", "checkpoint", str(pretrained))]})
    assert data.pretrained_checkpoint(matrix).path == str(pretrained)
    matrix.models = matrix.models[:2]
    assert data.pretrained_checkpoint(matrix) is None


def save_character_tokenizer(directory: Path) -> None:
    """A tokenizer of single characters (code points under 256, the tiny vocabulary; others unknown)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{chr(i): i for i in range(1, 256)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(directory)


def save_with_character_tokenizer(directory: Path) -> None:
    """The tiny Llama's random weights with the character tokenizer: a checkpoint that reads text but has learnt none."""
    save_character_tokenizer(directory)
    torch.manual_seed(0)
    build.instantiate(registry.load_config_dict("llama-3.2-1b-tiny"), "cpu", torch.float32).save_pretrained(directory)


def test_a_model_that_reads_text_is_measured_on_prose_and_one_that_does_not_on_random_ids(tmp_path):
    save_character_tokenizer(tmp_path)
    reader = ModelSpec("reader", "checkpoint", str(tmp_path))
    ids = texts.text_ids(reader, 4, 64, seed=3)
    assert ids.shape == (4, 64) and torch.equal(ids, texts.text_ids(reader, 4, 64, seed=3))
    assert not torch.equal(ids, texts.text_ids(reader, 4, 64, seed=4))
    prose = "".join(c if 0 < ord(c) < 256 else "\x00" for c in "".join(texts.reference_prose()))  # others read as <unk>, id 0
    assert all("".join(map(chr, row.tolist())) in prose for row in ids)
    assert texts.text_ids(ModelSpec("llama-3.2-1b-tiny", "registry", "x"), 4, 64, seed=3) is None
    (tmp_path / "tokenizer.json").unlink()
    assert texts.text_ids(ModelSpec("weights", "checkpoint", str(tmp_path)), 4, 64, seed=3) is None


@pytest.mark.slow
def test_a_checkpoint_with_a_tokenizer_runs_the_real_text_experiment(pytester, tmp_path):
    """The forgetting suite on a checkpoint that reads text: prose and addition, exact match
    recorded, full fine-tuning at the pretrained rates; a base of random weights has not learnt
    the prose, and the base's test says so."""
    checkpoint = tmp_path / "reads-text"
    save_with_character_tokenizer(checkpoint)
    suites = Path(__file__).parents[1] / "suites"
    (pytester.path / "suites").mkdir()
    for name in ("conftest.py", "test_forgetting.py"):
        (pytester.path / "suites" / name).write_text((suites / name).read_text())
    result = pytester.runpytest("--lora-bench", "suites", f"--lora-models={checkpoint}", "--lora-quant=fp32", "--lora-ranks=4",
                                "--lora-targets=q_proj,v_proj", "--lora-seeds=1", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*the base has not learnt task A*"])
    records = {r["test"].split("::")[1]: r for r in json.loads((pytester.path / "results" / "latest.json").read_text())["records"]}
    base = records["test_the_base_has_learnt_task_a"]
    assert base["model"] == "reads-text: Python's reference prose -> two-digit addition"
    assert base["metrics"]["uniform_loss"] == pytest.approx(math.log(256))
    assert 0 <= base["metrics"]["learn_exact_match_before"] <= 1
    [lora] = [r["metrics"] for name, r in records.items() if name.startswith("test_forgetting_lora[")]
    assert lora["fine_tune_lr"] == forgetting.REAL_LORA_LR and lora["seeds"] == 1 and lora["diverged"] in (0, 1)
    assert 0 <= lora["learn_exact_match_after"] <= 1
    full = [records[f"test_forgetting_full_finetuning[lr-{rate}]"]["metrics"]["fine_tune_lr"] for rate in ("higher", "lower")]
    assert tuple(full) == forgetting.REAL_FULL_LRS


@pytest.mark.slow
def test_the_trained_merge_on_a_checkpoint_that_reads_text_merges_an_adapter_that_learnt_addition(pytester, tmp_path):
    """On a checkpoint with a tokenizer, the trained-model merge fine-tunes one adapter on
    addition (on the float32 weights) and puts it on each format's base: there it has learnt (the
    loss below the base's on both bases), a float32 merge computes what it computed, and each
    merge's loss and exact match on the held-out problems are recorded."""
    checkpoint = tmp_path / "reads-text"
    save_with_character_tokenizer(checkpoint)
    suites = Path(__file__).parents[1] / "suites"
    (pytester.path / "suites").mkdir()
    for name in ("conftest.py", "test_merge.py"):
        (pytester.path / "suites" / name).write_text((suites / name).read_text())
    result = pytester.runpytest("--lora-bench", "suites", f"--lora-models={checkpoint}", "--lora-quant=fp32,nf4",
                                "-k", "test_merge_on_a_trained_model", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    records = {r["quant"]: r for r in json.loads((pytester.path / "results" / "latest.json").read_text())["records"]}
    assert {r["model"] for r in records.values()} == {"reads-text (LoRA on addition)"}
    fp32, nf4 = records["fp32"]["metrics"], records["nf4"]["metrics"]
    assert fp32["adapter_trained_on_this_base"] == nf4["adapter_trained_on_this_base"] == 0
    assert fp32["base_loss_b"] == nf4["base_loss_b"]  # one base before fine-tuning
    assert fp32["base_exact_b"] == nf4["base_exact_b"] and 0 <= fp32["base_exact_b"] <= 1
    for metrics in (fp32, nf4):  # the adapter loaded is the one that learnt: an untrained one scores the base's loss
        assert metrics["unmerged_loss_b"] < metrics["base_loss_b"] - 0.1
    assert fp32["merge_kl"] < 1e-6 and fp32["merged_loss_b"] == pytest.approx(fp32["unmerged_loss_b"], abs=1e-4)
    assert fp32["merged_exact_b"] == fp32["unmerged_exact_b"]
    assert nf4["merge_kl_dequantize"] < 1e-3 and nf4["merged_loss_b_original"] == pytest.approx(fp32["unmerged_loss_b"], abs=1e-3)
    assert all(0 <= nf4[f"merged_exact_b_{s}"] <= 1 for s in ("original", "dequantize", "requantize"))
