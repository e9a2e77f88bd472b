"""Trainer-level integration: `--optim badam` with a plain Trainer, BAdamTrainer, make_badam_trainer."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from transformers import HfArgumentParser, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import badam_hf
from badam_hf import BAdamCallback, BAdamConfig, BAdamConfigError, BAdamTrainer, BlockOptimizer, make_badam_trainer
from badam_hf.core.config import ScheduleConfig
from badam_hf.core.schedule import BlockSchedule
from badam_hf.core.optimizer import unwrap_optimizer
from tiny_models import snapshot

VOCAB = 64  # the tiny models' vocabulary (tests/tiny_models.py)


# --- data, arguments -----------------------------------------------------------------------------


def lm_data(n: int = 32, seq: int = 12, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, seq), generator=g)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def cls_data(n: int = 16, seq: int = 10, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    return [{"input_ids": x, "labels": y} for x, y in zip(ids, labels)]


def targs(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def changed(model, before) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def layer_params(model, prefix: str, i: int) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(f"{prefix}.{i}.")}


class BlockRecorder(TrainerCallback):
    """Active block before each optimizer step (the optimizer switches inside step()) and after sub-steps."""

    def __init__(self):
        self.step_begin: list[int] = []
        self.substep_end: list[int] = []

    def on_step_begin(self, args, state, control, optimizer=None, **kw):
        self.step_begin.append(unwrap_optimizer(optimizer).active_block)

    def on_substep_end(self, args, state, control, optimizer=None, **kw):
        self.substep_end.append(unwrap_optimizer(optimizer).active_block)


def no_files_written(path) -> bool:
    return not os.path.exists(path) or not any(os.scandir(path))


# --- argument parsing ----------------------------------------------------------------------------


def test_optim_badam_accepted_everywhere_arguments_are_parsed(tmp_path):
    out = str(tmp_path / "o")
    a = TrainingArguments(output_dir=out, optim="badam", optim_args="switch_every=5", report_to="none")
    assert a.optim == "badam"

    parser = HfArgumentParser(TrainingArguments)
    (b,) = parser.parse_args_into_dataclasses(
        ["--output_dir", out, "--optim", "badam", "--optim_args", "switch_every=5,switch_mode=ascending",
         "--report_to", "none"]
    )
    assert b.optim == "badam" and b.optim_args == "switch_every=5,switch_mode=ascending"

    (c,) = parser.parse_dict({"output_dir": out, "optim": "badam", "optim_args": "granularity=attn_mlp",
                              "report_to": "none"})
    assert c.optim == "badam"

    yml = tmp_path / "args.yaml"
    yml.write_text(f"output_dir: {out}\noptim: badam\noptim_args: switch_every=7\nreport_to: none\n")
    (d,) = parser.parse_yaml_file(str(yml))
    assert d.optim == "badam" and d.optim_args == "switch_every=7"

    # Bad settings fail at parse time, whatever the entry point.
    with pytest.raises(BAdamConfigError, match="unknown key.*'switch_evry'"):
        TrainingArguments(output_dir=out, optim="badam", optim_args="switch_evry=5", report_to="none")
    with pytest.raises(BAdamConfigError, match="switch_mode='bogus'"):
        parser.parse_dict({"output_dir": out, "optim": "badam", "optim_args": "switch_mode=bogus"})
    # Other optimizers' optim_args are not read by BAdam.
    TrainingArguments(output_dir=out, optim="adamw_torch", optim_args="whatever=1", report_to="none")
    assert no_files_written(out)


# --- a plain transformers.Trainer with --optim badam ---------------------------------------------


def test_plain_trainer_with_optim_badam(tmp_path, tiny_llama):
    model = tiny_llama()
    before = snapshot(model)
    args = targs(tmp_path, optim="badam", optim_args="switch_every=2,switch_mode=ascending", max_steps=4)
    trainer = Trainer(model=model, args=args, train_dataset=lm_data())
    trainer.train()

    opt = unwrap_optimizer(trainer.optimizer)
    assert isinstance(opt, BlockOptimizer) and opt is not trainer.optimizer  # wrapped by accelerate
    assert opt.global_step == 4
    trainer.create_optimizer()  # a second call must not add a second callback
    assert sum(isinstance(cb, BAdamCallback) for cb in trainer.callback_handler.callbacks) == 1

    steps = [h for h in trainer.state.log_history if "loss" in h]
    # Each log names the block that trained that step.
    assert [h["badam/active_block"] for h in steps] == [0, 0, 1, 1]
    assert [h["badam/active_block_name"] for h in steps] == ["model.layers.0"] * 2 + ["model.layers.1"] * 2

    assert changed(model, before) == layer_params(model, "model.layers", 0) | layer_params(model, "model.layers", 1)


# --- BAdamTrainer ------------------------------------------------------------------------------------


def test_badam_trainer_visits_each_block_exactly_k_steps(tmp_path, tiny_gpt2):
    D, K = 3, 2
    model = tiny_gpt2(layers=3)
    before = snapshot(model)
    cfg = BAdamConfig(schedule=ScheduleConfig(switch_every=K, switch_mode="random", seed=3))
    # args.optim stays at its default; badam_config= wins over args.optim_args.
    args = targs(tmp_path, max_steps=D * K, optim_args="switch_every=5")
    assert args.optim != "badam"
    rec = BlockRecorder()
    trainer = BAdamTrainer(model=model, args=args, train_dataset=lm_data(), badam_config=cfg, callbacks=[rec])
    trainer.train()

    assert isinstance(unwrap_optimizer(trainer.optimizer), BlockOptimizer)
    schedule = BlockSchedule(D, cfg.schedule)
    assert rec.step_begin == [schedule.block_at(t) for t in range(D * K)]
    runs = [rec.step_begin[i : i + K] for i in range(0, D * K, K)]
    assert all(len(set(r)) == 1 for r in runs)  # K consecutive steps per visit
    assert sorted(r[0] for r in runs) == list(range(D))  # every block once in the block-epoch
    # Every layer trained; embeddings, final norm and (tied) head did not.
    layers = set().union(*(layer_params(model, "transformer.h", i) for i in range(D)))
    assert changed(model, before) == layers


def test_no_switch_inside_gradient_accumulation_window(tmp_path, tiny_llama):
    model = tiny_llama(layers=3)
    # Which layer trains in each forward pass (micro-batch).
    per_forward: list[list[int]] = []

    def hook(module, args):
        if module.training:
            per_forward.append([i for i, layer in enumerate(model.model.layers) if layer.mlp.up_proj.weight.requires_grad])

    model.register_forward_pre_hook(hook)
    rec = BlockRecorder()
    args = targs(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=2, max_steps=4,
                 optim_args="switch_every=2,switch_mode=ascending")
    trainer = BAdamTrainer(model=model, args=args, train_dataset=lm_data(), callbacks=[rec])
    trainer.train()

    assert unwrap_optimizer(trainer.optimizer).global_step == 4
    assert rec.step_begin == [0, 0, 1, 1]
    assert rec.substep_end == [0, 0, 1, 1]  # mid-window: still the block the window started with
    assert per_forward == [[0]] * 4 + [[1]] * 4  # 2 optimizer steps x 2 micro-batches per block


def test_roberta_classifier_always_active(tmp_path, tiny_roberta):
    model = tiny_roberta(layers=2, max_positions=64, pad_token_id=1, num_labels=2)
    head = {n for n, _ in model.named_parameters() if n.startswith("classifier.")}
    assert head
    history: list[set[str]] = []

    class PerStep(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            self.before = snapshot(model)

        def on_step_end(self, args, state, control, model=None, **kw):
            history.append(changed(model, self.before))

    # optim="badam" as well as BAdamTrainer, and a user-supplied BAdamCallback: still one callback, one optimizer.
    args = targs(tmp_path, max_steps=4, optim="badam", optim_args="switch_every=1,switch_mode=ascending")
    trainer = BAdamTrainer(model=model, args=args, train_dataset=cls_data(), callbacks=[PerStep(), BAdamCallback()])
    assert trainer.optimizer is None
    trainer.train()
    assert sum(isinstance(cb, BAdamCallback) for cb in trainer.callback_handler.callbacks) == 1

    opt = unwrap_optimizer(trainer.optimizer)
    assert set(opt.partition.always_active) == head
    for step, diff in enumerate(history):
        layer = step % 2
        assert diff == head | layer_params(model, "roberta.encoder.layer", layer), step


def test_make_badam_trainer_on_custom_subclass(tmp_path, tiny_llama):
    calls = []

    class MyTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            calls.append(1)
            labels = inputs.pop("labels")
            logits = model(**inputs).logits[:, :-1]
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
            return (loss, None) if return_outputs else loss

    cls = make_badam_trainer(MyTrainer)
    assert issubclass(cls, MyTrainer) and issubclass(cls, badam_hf.BAdamMixin) and cls.__name__ == "BAdamMyTrainer"
    assert make_badam_trainer(cls) is cls
    model = tiny_llama(layers=2)
    before = snapshot(model)
    args = targs(tmp_path, max_steps=2, optim_args="switch_every=1,switch_mode=descending")
    trainer = cls(model=model, args=args, train_dataset=lm_data())
    trainer.train()
    assert len(calls) == 2
    assert isinstance(unwrap_optimizer(trainer.optimizer), BlockOptimizer)
    assert changed(model, before) == layer_params(model, "model.layers", 0) | layer_params(model, "model.layers", 1)


def _word_tokenizer():
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a cat dog sat ran on under mat log and fast slow big small red blue".split()
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", "<bos>", *words])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    ), words


def test_make_badam_trainer_trl_sft(tmp_path, tiny_llama):
    import datasets
    import trl
    tok, words = _word_tokenizer()
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[j] for j in torch.randint(0, len(words), (8,), generator=g).tolist()) for _ in range(16)]
    ds = datasets.Dataset.from_dict({"text": texts})
    model = tiny_llama(layers=2, vocab=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=tok.bos_token_id)
    before = snapshot(model)
    cfg = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
        max_length=16, optim="badam", optim_args="switch_every=1,switch_mode=ascending",
    )
    trainer = make_badam_trainer(trl.SFTTrainer)(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    trainer.train()
    assert isinstance(unwrap_optimizer(trainer.optimizer), BlockOptimizer)
    assert [h["badam/active_block"] for h in trainer.state.log_history if "loss" in h] == [0, 1]
    assert changed(model, before) == layer_params(model, "model.layers", 0) | layer_params(model, "model.layers", 1)


# --- errors before training ----------------------------------------------------------------------


class NoStack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 16)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, VOCAB)

    def forward(self, input_ids, labels=None):
        logits = self.b(torch.relu(self.a(self.emb(input_ids))))
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        return {"loss": loss, "logits": logits}


def test_errors_at_construction_before_any_file_is_written(tmp_path, tiny_llama):
    import peft
    out = tmp_path / "out"
    data = lm_data(8)

    with pytest.raises(BAdamConfigError, match="unknown key.*'switch_evry'"):
        BAdamTrainer(model=tiny_llama(2), args=targs(tmp_path, optim_args="switch_evry=2"), train_dataset=data)

    lora = peft.get_peft_model(tiny_llama(2), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(BAdamConfigError, match="PEFT"):
        BAdamTrainer(model=lora, args=targs(tmp_path), train_dataset=data)

    with pytest.raises(BAdamConfigError, match="'model.nope' matches no parameter"):
        BAdamTrainer(model=tiny_llama(2), args=targs(tmp_path, optim_target_modules=["model.nope"]), train_dataset=data)

    with pytest.raises(BAdamConfigError, match="no stack of repeated layers.*optim_target_modules"):
        BAdamTrainer(model=NoStack(), args=targs(tmp_path), train_dataset=data)

    # A plain Trainer with --optim badam fails when train() builds the optimizer, before the first step.
    trainer = Trainer(model=NoStack(), args=targs(tmp_path, optim="badam", save_steps=1, save_strategy="steps"),
                      train_dataset=data)
    with pytest.raises(BAdamConfigError, match="optim_target_modules"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert no_files_written(out)


def test_custom_model_with_explicit_target_modules(tmp_path):
    model = NoStack()
    before = snapshot(model)
    args = targs(tmp_path, optim="badam", optim_target_modules=["a", "b"], optim_args="switch_every=1,switch_mode=ascending",
                 max_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=lm_data(8))
    trainer.train()
    assert unwrap_optimizer(trainer.optimizer).partition.names == ["a", "b"]
    assert changed(model, before) == {"a.weight", "a.bias"}


# --- learning-rate schedule and checkpoints ------------------------------------------------------


def test_lr_schedule_matches_adamw(tmp_path, tiny_llama):
    used = {}

    class LR(TrainerCallback):
        def __init__(self, key):
            self.key = key

        def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
            opt = unwrap_optimizer(optimizer) or optimizer.optimizer
            inner = opt.inner if isinstance(opt, BlockOptimizer) else opt
            used.setdefault(self.key, []).append([g["lr"] for g in inner.param_groups])  # what the update used

    logged = {}
    for optim in ("adamw_torch", "badam"):
        args = targs(tmp_path / optim, optim=optim, max_steps=6, lr_scheduler_type="cosine", warmup_steps=2,
                     optim_args="switch_every=2" if optim == "badam" else None)
        trainer = Trainer(model=tiny_llama(2), args=args, train_dataset=lm_data(), callbacks=[LR(optim)])
        trainer.train()
        logged[optim] = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert len(logged["badam"]) == 6 and logged["badam"] == logged["adamw_torch"]
    assert logged["badam"][0] < logged["badam"][1] > logged["badam"][-1] > 0  # warmup then decay
    assert used["badam"] == used["adamw_torch"]
    assert [lrs[0] for lrs in used["badam"]] == logged["badam"]


def test_checkpoint_loads_with_plain_from_pretrained(tmp_path, tiny_llama):
    model = tiny_llama(3)
    args = targs(tmp_path, max_steps=4, save_strategy="steps", save_steps=4,
                 optim_args="switch_every=1,switch_mode=random,seed=1")
    trainer = BAdamTrainer(model=model, args=args, train_dataset=lm_data())
    trainer.train()
    ckpt = tmp_path / "out" / "checkpoint-4"
    loaded = LlamaForCausalLM.from_pretrained(str(ckpt))
    trained = dict(model.named_parameters())
    for n, p in loaded.named_parameters():
        assert torch.equal(p, trained[n]), n
    # from_pretrained leaves everything trainable, as for any HF checkpoint.
    assert all(p.requires_grad for p in loaded.parameters())
