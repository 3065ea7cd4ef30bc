"""GGUF files as checkpoints (``models.gguf``), on files these tests write with the ``gguf``
package: a tiny Llama whose tensors are known, so that the conversion can be checked exactly.

- a ``.gguf`` path (or a directory holding one) runs the params and merge suites, its records
  under the file's name; converted once, the second run reads the cache;
- the converted weights are the file's, bit for bit (q and k un-permuted as llama.cpp permutes them);
- a corrupt file, an architecture transformers can't read and a missing ``gguf`` package are
  usage errors (exit 4) that name the file, before anything runs.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from pytest_lora import count_parameters
from pytest_lora.models import build, gguf, registry
from pytest_lora.models.resolve import resolve_model
from pytest_lora.specs import MatrixError

gguf_package = pytest.importorskip("gguf")

TINY = "llama-3.2-1b-tiny"


def llama_cpp_order(tensor, heads: int):
    """q and k rows as llama.cpp's converter writes them (transformers' loader undoes it)."""
    return tensor.reshape(heads, 2, tensor.shape[0] // heads // 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)


def write_gguf(path, config: dict, state: dict, architecture: str = "llama", tokenizer: bool = False) -> None:
    """A float32 GGUF file of a Llama ``state`` dict, with the metadata transformers reads; with
    ``tokenizer``, a byte-level BPE tokenizer (GPT-2's byte alphabet, no merges) of 256 tokens."""
    names = gguf_package.get_tensor_name_map(gguf_package.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    writer = gguf_package.GGUFWriter(str(path), architecture)
    writer.add_name("tiny llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    if tokenizer:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(list(bytes_to_unicode().values())[: config["vocab_size"]])
        writer.add_token_types([1] * config["vocab_size"])
        writer.add_token_scores([0.0] * config["vocab_size"])  # no merges: transformers derives none from single bytes
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(1)
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        array = tensor.numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            array = llama_cpp_order(array, heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), array.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_LORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny_gguf(tmp_path):
    """A GGUF file of the tiny Llama's random weights, and those weights."""
    config = registry.load_config_dict(TINY)
    torch.manual_seed(0)
    state = build.instantiate(config, "cpu", torch.float32).state_dict()
    path = tmp_path / "files" / "tiny-llama.gguf"
    path.parent.mkdir()
    write_gguf(path, config, state)
    return path, state


def test_a_gguf_file_is_converted_once_to_the_weights_it_holds(tiny_gguf, cache, monkeypatch):
    path, state = tiny_gguf
    spec = resolve_model(str(path), "--lora-models")
    assert (spec.kind, spec.id) == ("checkpoint", "tiny-llama")
    loaded = build.instantiate(spec.config_dict(), "cpu", torch.float32)
    loaded.load_state_dict(build.model_class(spec.config_dict()).from_pretrained(spec.path, dtype=torch.float32).state_dict())
    for name, tensor in state.items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    count = count_parameters(TINY, {"r": 1, "target_modules": ["q_proj"]})
    assert gguf.converted_info(gguf.checkpoint_of(path, "test", "x"))["parameters"] == count.total - count.trainable
    monkeypatch.setattr(gguf, "convert", lambda *args: pytest.fail("converted twice"))
    assert resolve_model(str(path.parent), "--lora-models").path == spec.path  # a directory holding one file; the cache


def test_a_gguf_path_runs_the_params_and_merge_suites(pytester, tiny_gguf, cache):
    path, _ = tiny_gguf
    result = pytester.runpytest("--lora-bench", f"--lora-models={path}", "--lora-quant=fp32,nf4", "--lora-ranks=4", "--lora-targets=default",
                                "-m", "lora_params or lora_merge", "-k", "not test_merge_on_a_trained_model", "-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str()[-3000:]
    assert "base_model_name_or_path` was renamed" not in result.stdout.str()  # a checkpoint has a name: peft said so per adapter
    records = json.loads((pytester.path / "results" / "latest.json").read_text())["records"]
    measured = [r for r in records if r["status"] == "ok" and not registry.is_known(r["model"] or "")]  # published counts aside
    assert {r["model"] for r in measured} == {"tiny-llama"}
    assert {r["suite"] for r in measured} == {"params", "merge"}
    [params] = [r for r in measured if "test_trainable_parameters" in r["test"] and r["quant"] == "fp32"]
    assert params["metrics"]["trainable_params"] == count_parameters(TINY, {"r": 4, "target_modules": ["q_proj", "v_proj"]}).trainable
    assert any(r["quant"] == "nf4" and r["metrics"].get("merge_kl_dequantize") is not None for r in measured)


def test_a_corrupt_or_unsupported_gguf_is_a_usage_error_naming_the_file(pytester, tiny_gguf, cache, tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    result = pytester.runpytest("--lora-bench", f"--lora-models={corrupt}", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--lora-models: '*corrupt.gguf'*is not a readable GGUF file (*"])  # a long path is shortened
    path, state = tiny_gguf
    other = tmp_path / "other.gguf"
    write_gguf(other, registry.load_config_dict(TINY), state, architecture="rwkv6")
    with pytest.raises(MatrixError, match=r"is a GGUF file of architecture 'rwkv6', which transformers' GGUF loader can't read; "
                                          r"allowed: GGUF architectures llama, mistral, .*gpt2"):
        resolve_model(str(other), "--lora-models")
    assert not cache.exists() or not any(cache.rglob("config.json"))  # nothing converted


def test_without_the_gguf_package_a_gguf_file_says_how_to_install_it(tiny_gguf, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    with pytest.raises(MatrixError, match=r"reading one needs the gguf package: pip install gguf"):
        resolve_model(str(tiny_gguf[0]), "--lora-models")


def test_a_conversion_that_loses_the_race_keeps_the_winner_s_and_a_half_done_one_is_an_error(tiny_gguf, cache, tmp_path):
    """Two processes (xdist workers) may convert the same file at once: the rename of the second
    finds the first's checkpoint and leaves it; a directory without the conversion's last file is
    not taken for a checkpoint."""
    path, _ = tiny_gguf
    done = tmp_path / "done"
    done.mkdir()
    (done / gguf.DONE).write_text("{}")
    (done / "config.json").write_text("{}")
    gguf.convert(path, done, "test", "x")  # lost the race: the winner's files stay
    assert (done / "config.json").read_text() == "{}" and not list(tmp_path.glob(".converting-*"))
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    with pytest.raises(OSError):
        gguf.convert(path, half, "test", "x")
    assert not list(tmp_path.glob(".converting-*"))  # its temporary directory is removed either way


def test_a_file_transformers_can_t_load_is_a_usage_error_naming_it(tiny_gguf, cache, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise ValueError("tensor blk.0.attn_q.weight has an unknown type")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(MatrixError, match=r"could not be read by transformers' GGUF loader \(ValueError: tensor blk.0.attn_q.weight"):
        resolve_model(str(tiny_gguf[0]), "--lora-models")


def test_a_gguf_file_s_own_tokenizer_is_saved_with_its_weights(tiny_gguf, cache, tmp_path):
    """A GGUF file that carries a tokenizer gives a checkpoint that reads text (measured on prose)."""
    import transformers

    _, state = tiny_gguf
    path = tmp_path / "with-tokenizer.gguf"
    write_gguf(path, registry.load_config_dict(TINY), state, tokenizer=True)
    spec = resolve_model(str(path), "--lora-models")
    assert registry.has_tokenizer(spec.path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec.path)
    assert tokenizer.decode(tokenizer("07+25=032")["input_ids"]) == "07+25=032"
