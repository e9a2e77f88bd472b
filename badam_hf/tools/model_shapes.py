"""Model shapes by name, offline: the published architectures `badam-hf estimate` and the dry run know
without a download, a local config.json or model folder, or a hub name (its config only)."""

from __future__ import annotations

import json
import os

# Published architecture shapes, so estimates work offline.
BUILTIN_SHAPES = {
    "llama2-7b": dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, tie_word_embeddings=False,
    ),
    "llama3-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=False,
    ),
    "llama3-70b": dict(
        model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=False,
    ),
    "roberta-large": dict(
        model_type="roberta", vocab_size=50265, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, max_position_embeddings=514, type_vocab_size=1,
    ),
}


def load_config(model: str):
    """A built-in shape name, a local config.json or model folder, or a hub name (config only)."""
    from transformers import AutoConfig, CONFIG_MAPPING

    if model in BUILTIN_SHAPES:
        spec = dict(BUILTIN_SHAPES[model])
        return CONFIG_MAPPING[spec.pop("model_type")](**spec)
    if os.path.isfile(model):
        with open(model) as f:
            spec = json.load(f)
        model_type = spec.pop("model_type", None)
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"{model}: model_type {model_type!r} is not a transformers architecture.")
        return CONFIG_MAPPING[model_type](**spec)
    try:
        return AutoConfig.from_pretrained(model)
    except Exception as e:  # offline, or no such model
        raise ValueError(
            f"cannot read a config for {model!r} ({type(e).__name__}); give a built-in shape "
            f"({', '.join(BUILTIN_SHAPES)}), a local config.json, or a model folder."
        ) from None
