"""Tiny models built from configs (no downloads): the one set of builders of the test suite.

Tests get these builders as pytest fixtures (tests/conftest.py): `def test_x(tiny_llama): tiny_llama(layers=2)`.
Code that runs outside pytest (the torchrun workers in tests/dist_workers/) imports this module; the launcher,
dist_common.run_processes, puts tests/ on PYTHONPATH.

Only `layers` is positional. Every builder seeds torch's global RNG with `seed` (None: leaves it as it is, so
that several models can be built from one seed), builds the config, then the model, casts it to `dtype`, and
with `train=True` calls `.train()` (a model built from a config starts in train mode already; the flag makes a
test that depends on it say so). The named size parameters map to the config's fields; one given as None
leaves the config's own default; further keyword arguments go to the config unchanged (`attention_bias=True`,
`tie_word_embeddings=True`, `num_labels=3`, `pad_token_id=0`, ...).
"""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForMultipleChoice,
    RobertaForSequenceClassification,
)

VOCAB = 64


def _given(**fields) -> dict:
    """The fields that were given (None: the config's default)."""
    return {k: v for k, v in fields.items() if v is not None}


def _build(cls, cfg, dtype, train):
    model = cls(cfg).to(dtype)
    return model.train() if train else model


def _check(layers: int) -> None:
    if layers < 1:  # e.g. a seed passed where the layer count goes: tiny_llama(0)
        raise ValueError(f"a tiny model needs at least one layer, got layers={layers}")


def tiny_llama(layers: int = 4, *, dtype: torch.dtype = torch.float32, seed: int | None = 0,
               head: str = "lm", train: bool = False, vocab: int | None = VOCAB, hidden: int | None = 32,
               intermediate: int | None = 64, heads: int | None = 4, kv_heads: int | None = 2,
               max_positions: int | None = 64, **config):
    """LlamaForCausalLM (head="lm") or LlamaForSequenceClassification (head="classification"; pass
    num_labels, and pad_token_id for batches with padding)."""
    _check(layers)
    cls = {"lm": LlamaForCausalLM, "classification": LlamaForSequenceClassification}[head]
    if seed is not None:
        torch.manual_seed(seed)
    cfg = LlamaConfig(**_given(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
    ), **config)
    return _build(cls, cfg, dtype, train)


def tiny_qwen2(layers: int = 4, *, dtype: torch.dtype = torch.float32, seed: int | None = 0,
               train: bool = False, vocab: int | None = VOCAB, hidden: int | None = 32,
               intermediate: int | None = 64, heads: int | None = 4, kv_heads: int | None = 2,
               max_positions: int | None = 64, **config):
    """Qwen2ForCausalLM (q/k/v projections with biases; untied head unless tie_word_embeddings=True)."""
    _check(layers)
    if seed is not None:
        torch.manual_seed(seed)
    cfg = Qwen2Config(**_given(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
    ), **config)
    return _build(Qwen2ForCausalLM, cfg, dtype, train)


def tiny_gpt2(layers: int = 4, *, dtype: torch.dtype = torch.float32, seed: int | None = 0,
              train: bool = False, vocab: int | None = VOCAB, hidden: int | None = 32, heads: int | None = 4,
              max_positions: int | None = 64, dropout: float | None = 0.0, **config):
    """GPT2LMHeadModel (head tied to the token embedding). `dropout`: resid/embd/attn dropout (None: GPT-2's
    defaults of 0.1)."""
    _check(layers)
    if seed is not None:
        torch.manual_seed(seed)
    cfg = GPT2Config(**_given(
        vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    ), **config)
    return _build(GPT2LMHeadModel, cfg, dtype, train)


def tiny_roberta(layers: int = 4, *, dtype: torch.dtype = torch.float32, seed: int | None = 0,
                 head: str = "classification", train: bool = False, vocab: int | None = VOCAB,
                 hidden: int | None = 32, intermediate: int | None = 64, heads: int | None = 4,
                 max_positions: int | None = 40, type_vocab: int | None = 1, dropout: float | None = 0.0,
                 **config):
    """RobertaForSequenceClassification (head="classification"; num_labels: the config's default of 2 unless
    given) or RobertaForMultipleChoice (head="multiple_choice"). `dropout`: hidden and attention dropout
    (None: RoBERTa's defaults of 0.1); `type_vocab`: None for RoBERTa's default of 2 token types."""
    _check(layers)
    cls = {"classification": RobertaForSequenceClassification, "multiple_choice": RobertaForMultipleChoice}[head]
    if seed is not None:
        torch.manual_seed(seed)
    cfg = RobertaConfig(**_given(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=max_positions, type_vocab_size=type_vocab,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    ), **config)
    return _build(cls, cfg, dtype, train)


BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2, "roberta": tiny_roberta}


def tiny_model(family: str, *args, **kw):
    """The builder of `family` ("llama", "qwen2", "gpt2", "roberta"), called with the rest: for tests
    parametrized over architectures."""
    return BUILDERS[family](*args, **kw)


# --- helpers the unit tests share --------------------------------------------------------------------------
# Each test file draws its batches from its own seed range (`offset`), so that files do not train on the same
# token sequences; a file binds its offset once: `batch = functools.partial(tiny_models.batch, offset=1000)`.


def batch(seed: int, bs: int = 2, seq: int = 8, *, offset: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    """Random token ids (bs x seq) below `vocab`, a pure function of offset + seed."""
    g = torch.Generator().manual_seed(offset + seed)
    return torch.randint(0, vocab, (bs, seq), generator=g)


def backward(model, seed: int, scale: float = 1.0, *, offset: int = 0) -> None:
    """One backward of the language-model loss (times `scale`) on `batch(seed, offset=offset)`."""
    ids = batch(seed, offset=offset)
    (model(input_ids=ids, labels=ids).loss * scale).backward()


def snapshot(model) -> dict[str, torch.Tensor]:
    """A detached copy of every named parameter (to compare weights before and after a step)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def active_names(opt) -> list[str]:
    """The parameter names a BlockOptimizer trains now: its active block's, then the always-active ones."""
    return list(opt.partition.blocks[opt.active_block].param_names) + list(opt.partition.always_active)
