"""Two training stages on one model in one process (SFT, then DPO; a notebook's second Trainer): the second
stage's BlockOptimizer closes the first one, so none of its hooks cut the second stage's backward or take its
gradients, and none of its state stays alive."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from badam_hf import BAdamConfig, BAdamTrainer, make_badam_trainer
from badam_hf.core.optimizer import live_optimizer, unwrap_optimizer
from tiny_models import snapshot

pytestmark = pytest.mark.integration

VOCAB = 64  # the tiny models' vocabulary (tests/tiny_models.py)


def hook_count(model) -> int:
    n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
            for m in model.modules())
    return n + sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())


def test_badam_sft_then_badam_dpo_trains_every_block_the_second_stage_visits(tmp_path, tiny_llama):
    from trl import DPOConfig, DPOTrainer

    from trl_local import WORDS, tokenizer as word_tokenizer

    model, ref = tiny_llama(layers=4), tiny_llama(layers=4)
    tokenizer = word_tokenizer()
    common = dict(per_device_train_batch_size=2, learning_rate=1e-3, report_to="none", use_cpu=True,
                  save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, bf16=False)

    # Stage 1: SFT-like causal LM training, descending from the top layer (its truncation cut sits high).
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (8, 12), generator=g)
    sft = BAdamTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "sft"), max_steps=3, **common),
                       train_dataset=[{"input_ids": x, "labels": x.clone()} for x in ids],
                       badam_config=BAdamConfig.from_flat({"switch_every": 2, "switch_mode": "descending"}))
    sft.train()
    first = unwrap_optimizer(sft.optimizer)
    assert first.active_block == 2 and first.memory_bytes()["optimizer_state"] > 0  # mid-visit, state alive
    assert live_optimizer(model) is first and not first.closed  # on_train_end does not close it

    # Stage 2: DPO, ascending over every layer, one step each.
    rows = [{"prompt": f"please repeat {WORDS[i % 10]}", "chosen": f" {WORDS[i % 10]}",
             "rejected": f" {WORDS[(i + 3) % 10]}"} for i in range(16)]
    dpo = make_badam_trainer(DPOTrainer)(
        model=model, ref_model=ref, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
        args=DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=4, max_length=32, **common),
        badam_config=BAdamConfig.from_flat({"switch_every": 1, "switch_mode": "ascending"}))
    before = snapshot(model)
    dpo.train()
    second = unwrap_optimizer(dpo.optimizer)
    assert second is not first and first.closed and live_optimizer(model) is second
    after = snapshot(model)
    for layer in range(4):
        names = [n for n in before if n.startswith(f"model.layers.{layer}.")]
        assert any(not torch.equal(before[n], after[n]) for n in names), f"stage 2 never moved layer {layer}"

    # Nothing of the first optimizer is left: no state, and once its Trainer goes, nothing holds it.
    assert set(first.memory_bytes().values()) == {0} and not first.inner.state
    first_ref = weakref.ref(first)
    del sft, first
    gc.collect()
    assert first_ref() is None
    hooks = hook_count(model)
    second.close()
    assert hook_count(model) < hooks
