"""Tiny variants: a published architecture at small dimensions, for the CPU.

A tiny variant keeps what decides the code path and the shape of the counting: the model class,
gated or plain MLP, the grouped-query ratio (one key/value head for Llama 3's 8 of 32), tied or
untied output embeddings, biases, Conv1D (GPT-2) or Linear, encoder-decoder or not. It changes
only sizes: width 64, two layers, four heads of 16, an MLP of 128 and a vocabulary of 256.
Every Linear weight then holds a whole number of 64-weight quantization blocks.
"""

from __future__ import annotations

from typing import Any

WIDTH, LAYERS, HEADS, MLP, VOCAB, POSITIONS = 64, 2, 4, 128, 256, 512

_DECODER_LM = {  # rotary positions: no parameters, and rope scaling needs the published maximum
    "hidden_size": WIDTH,
    "intermediate_size": MLP,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
}
_T5 = {"d_model": WIDTH, "d_ff": MLP, "d_kv": WIDTH // HEADS, "num_heads": HEADS, "num_layers": LAYERS, "num_decoder_layers": LAYERS}

SHRINK: dict[str, dict[str, Any]] = {
    "llama": _DECODER_LM,
    "mistral": _DECODER_LM,
    "qwen2": {**_DECODER_LM, "max_window_layers": LAYERS},
    "t5": _T5,
    "mt5": _T5,
    "gpt2": {"n_embd": WIDTH, "n_head": HEADS, "n_layer": LAYERS, "n_positions": POSITIONS, "n_ctx": POSITIONS},
    "roberta": {"hidden_size": WIDTH, "intermediate_size": MLP, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS},
    "opt": {
        "hidden_size": WIDTH,
        "ffn_dim": MLP,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "word_embed_proj_dim": WIDTH,
        "max_position_embeddings": POSITIONS,
    },
    "bloom": {"hidden_size": WIDTH, "n_head": HEADS, "n_layer": LAYERS},
}

_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "unk_token_id")


def supported() -> list[str]:
    return sorted(SHRINK)


def shrink(config: dict[str, Any]) -> dict[str, Any]:
    """The tiny variant of a config dict; raises ``ValueError`` for an architecture we can't shrink."""
    model_type = config["model_type"]
    if model_type not in SHRINK:
        raise ValueError(f"no tiny variant for model_type {model_type!r}; known: {', '.join(supported())}")
    small = {**config, **SHRINK[model_type], "vocab_size": VOCAB}
    if "num_key_value_heads" in config:
        ratio = config["num_key_value_heads"] / config["num_attention_heads"]
        small["num_key_value_heads"] = max(1, round(HEADS * ratio))
    if config.get("head_dim") is not None:
        small["head_dim"] = WIDTH // HEADS
    for key in _TOKEN_IDS:
        small[key] = _token_id_in_vocab(config.get(key), key)
    return small


def _token_id_in_vocab(value: Any, key: str) -> Any:
    """Special token ids of a big vocabulary (128000 and up) moved inside the tiny one."""
    if isinstance(value, list):
        return [_token_id_in_vocab(item, key) for item in value]
    if isinstance(value, int) and value >= VOCAB:
        return VOCAB - 1 - _TOKEN_IDS.index(key)
    return value
