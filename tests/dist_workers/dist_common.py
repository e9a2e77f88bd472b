"""Shared pieces of the torchrun workers used by tests/test_distributed.py (CPU, gloo)."""

from __future__ import annotations

import json
import os
import sys

import torch

VOCAB = 64
SEQ = 12


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def batch(tag: int, step: int, micro: int, rank: int, size: int = 2) -> torch.Tensor:
    """Deterministic token ids, different for every (scenario, step, micro-batch, rank)."""
    g = torch.Generator().manual_seed(1_000_000 * tag + 10_000 * step + 100 * micro + rank)
    return torch.randint(0, VOCAB, (size, SEQ), generator=g)


def params_cpu(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def finish() -> None:
    """End a torchrun worker cleanly: barrier, flush, and skip interpreter teardown (which can abort with
    'terminate called without an active exception' after gloo has been used)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
