"""A model holding PEFT adapter layers is refused, wrapped or not, with advice that works: the merged model
(`merge_and_unload()`) trains with BAdam and its checkpoint loads with plain `from_pretrained`, no key missing."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

from badam_hf import BAdamConfigError, BAdamTrainer, BlockOptimizer

LORA = dict(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B != 0: the merge changes weights
ADVICE = r"merge_and_unload\(\).*without BAdam"


def data(n=8, seq=10):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 64, (n, seq), generator=g)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def test_wrapped_unwrapped_and_transformers_adapters_are_refused(tiny_llama, tmp_path):
    peft_model = get_peft_model(tiny_llama(2), LoraConfig(**LORA))
    with pytest.raises(BAdamConfigError, match=ADVICE):
        BlockOptimizer(peft_model)
    # The old advice (get_base_model()) still holds the LoRA layers: refused as well, naming one.
    with pytest.raises(BAdamConfigError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*" + ADVICE):
        BlockOptimizer(peft_model.get_base_model())
    # LoRA layers injected into a plain model (what transformers' add_adapter / load_adapter do).
    added = inject_adapter_in_model(LoraConfig(**LORA), tiny_llama(2))
    with pytest.raises(BAdamConfigError, match=ADVICE):
        BlockOptimizer(added)
    args = TrainingArguments(output_dir=str(tmp_path), optim="badam", report_to="none", use_cpu=True)
    with pytest.raises(BAdamConfigError, match=ADVICE):  # refused when the Trainer is built, before training
        BAdamTrainer(model=peft_model.get_base_model(), args=args, train_dataset=data())
    # Nothing was changed by the refusals: the adapters are still trainable.
    assert all(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" in n)


def test_the_advice_works_merged_model_trains_and_loads_with_from_pretrained(tiny_llama, tmp_path):
    base = tiny_llama(2)
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged = get_peft_model(base, LoraConfig(**LORA)).merge_and_unload()
    assert isinstance(merged, LlamaForCausalLM) and set(dict(merged.named_parameters())) == set(original)
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, original["model.layers.0.self_attn.q_proj.weight"])

    args = TrainingArguments(output_dir=str(tmp_path / "run"), optim="badam", optim_args="switch_every=2,switch_mode=ascending",
                             max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, report_to="none",
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=merged, args=args, train_dataset=data())
    trained_before = {n: p.detach().clone() for n, p in merged.named_parameters()}
    trainer.train()
    moved = {n for n, p in merged.named_parameters() if not torch.equal(p, trained_before[n])}
    assert moved and all(n.startswith(("model.layers.0.", "model.layers.1.")) for n in moved)

    trainer.save_model(str(tmp_path / "saved"))
    loaded, info = LlamaForCausalLM.from_pretrained(str(tmp_path / "saved"), output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    mine = dict(merged.named_parameters())
    for n, p in loaded.named_parameters():
        assert torch.equal(p, mine[n]), n
