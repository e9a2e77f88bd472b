"""Memory estimates per method, counted from a model config without allocating weights.

Byte conventions follow the paper's Table 2 (mixed precision): weights in bf16 (2 bytes per
parameter); a trained parameter carries an fp32 gradient (4) and fp32 master + two Adam moments (12).
So Adam needs 2 + 4 + 12 = 18 bytes per parameter, and BAdam 2 per parameter plus 16 per parameter of
its largest block. That is what `BlockOptimizer` holds: with `fp32_grad_accumulation` (the default) the
active block's gradients go straight into one fp32 buffer (4 bytes; no bf16 gradient of 2 more bytes is
kept), and its master is made at the block's first step, after that step's backward, and held as its 16
low bits between steps (`split_masters`). Activations are a rough estimate (see `activation_bytes`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import PartitionConfig
from ..core.partition import partition_model

GB = 1e9

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


def build_meta_model(config) -> nn.Module:
    """The model with every tensor on the meta device: shapes without memory."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if config.model_type in ("roberta", "bert") else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


@dataclass
class Estimate:
    method: str
    weights: float
    gradients: float
    optimizer_states: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer_states + self.activations


def activation_bytes(config, batch: int, seq: int, gradient_checkpointing: bool) -> float:
    """Rough bf16 activation memory. With checkpointing: each layer's input plus one layer's full
    activations during recompute; without: per layer about seq*batch*hidden*(34 + 5*heads*seq/hidden)
    bytes (Korthikanti et al., 2022)."""
    h, L, a = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    per_layer_full = seq * batch * h * (34 + 5 * a * seq / h)
    logits = 4 * batch * seq * config.vocab_size  # fp32 logits for the loss
    if gradient_checkpointing:
        return L * 2 * batch * seq * h + per_layer_full + logits
    return L * per_layer_full + logits


def estimate(
    model: str,
    gpus: int = 1,
    batch: int = 1,
    seq: int = 512,
    gradient_checkpointing: bool = True,
    granularity: str = "layer",
    lora_rank: int = 8,
) -> tuple[dict, list[Estimate]]:
    for name, value in (("gpus", gpus), ("batch", batch), ("seq", seq), ("lora_rank", lora_rank)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}: {name} must be a whole number >= 1.")
    config = load_config(model)
    meta = build_meta_model(config)
    total = sum(p.numel() for p in meta.parameters())
    partition = partition_model(meta, PartitionConfig(granularity=granularity, always_active=[]))
    params = dict(meta.named_parameters())
    block_sizes = [sum(params[n].numel() for n in b.param_names) for b in partition.blocks]
    active = max(block_sizes)
    act = activation_bytes(config, batch, seq, gradient_checkpointing)
    # LoRA on the q/v projections (the paper's setting): two rank-r matrices per adapted projection.
    h, L = config.hidden_size, config.num_hidden_layers
    kv = h * getattr(config, "num_key_value_heads", config.num_attention_heads) // config.num_attention_heads
    lora = L * lora_rank * ((h + h) + (h + kv))
    largest_matrix = max(p.numel() for p in meta.parameters())
    n = gpus
    rows = [
        Estimate("Adam (mixed precision)", 2 * total / n, 4 * total / n, 12 * total / n, act),
        Estimate(f"LoRA (rank {lora_rank})", (2 * total + 2 * lora) / n, 4 * lora / n, 12 * lora / n, act),
        Estimate("LOMO", 2 * total / n, 2 * largest_matrix, 0.0, act),
        Estimate("BAdam", 2 * total / n, 4 * active / n, 12 * active / n, act),
    ]
    info = {
        "model": model,
        "parameters": total,
        "blocks": len(partition),
        "largest_block": active,
        "gpus": n,
        "batch": batch,
        "seq": seq,
        "gradient_checkpointing": gradient_checkpointing,
    }
    return info, rows


def format_table(info: dict, rows: list[Estimate]) -> str:
    per = " per GPU" if info["gpus"] > 1 else ""
    lines = [
        f"{info['model']}: {info['parameters'] / 1e9:.2f}B parameters, BAdam D={info['blocks']} blocks "
        f"(largest {info['largest_block'] / 1e6:.1f}M), batch {info['batch']} x seq {info['seq']}, "
        f"gradient checkpointing {'on' if info['gradient_checkpointing'] else 'off'}, {info['gpus']} GPU(s)",
        "",
        f"| method | weights | gradients | optimizer states | activations (est.) | total{per} |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.weights / GB:.1f} GB | {r.gradients / GB:.1f} GB | {r.optimizer_states / GB:.1f} GB "
            f"| {r.activations / GB:.1f} GB | {r.total / GB:.1f} GB |"
        )
    bf16_grads = 2 * info["largest_block"] / info["gpus"]
    lines += ["", f"BAdam's gradients are fp32 straight from backward (fp32_grad_accumulation, the default); with "
              f"fp32_grad_accumulation=false the bf16 gradient is also kept until the step: +{bf16_grads / GB:.2f} GB. "
              f"The 16 bytes per active parameter all exist at the step; through forward and backward the fp32 master "
              f"is held as its 16 low bits (split_masters): {bf16_grads / GB:.2f} GB less there."]
    return "\n".join(lines)
