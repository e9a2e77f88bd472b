"""Exact resume: stopping at a checkpoint in the middle of a block and resuming gives bit-identical weights."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from badam_hf import BAdamTrainer
from badam_hf.core.optimizer import unwrap_optimizer

VOCAB = 64
K, SAVE, MAX = 3, 4, 10  # the checkpoint at step 4 falls one step into the second block
OPTIM_ARGS = f"switch_every={K},switch_mode=random,seed=7"


def data(n: int = 24, seq: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, seq), generator=g)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


class BlockRecorder(TrainerCallback):
    """Active block before each optimizer step, by global step."""

    def __init__(self):
        self.blocks: dict[int, int] = {}

    def on_step_begin(self, args, state, control, optimizer=None, **kw):
        self.blocks[state.global_step] = unwrap_optimizer(optimizer).active_block


def make_trainer(tiny_llama, out, dtype, max_steps=MAX, model_seed=0, optim_args=OPTIM_ARGS):
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.1, save_strategy="steps", save_steps=SAVE,
        report_to="none", use_cpu=True, logging_steps=1, disable_tqdm=True, seed=0, optim_args=optim_args,
    )
    rec = BlockRecorder()
    model = tiny_llama(dtype=dtype, seed=model_seed, attention_dropout=0.0)
    trainer = BAdamTrainer(model=model, args=args, train_dataset=data(), callbacks=[rec])
    return trainer, rec


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def full_run(request, tmp_path_factory, tiny_llama):
    """One uninterrupted run; its checkpoint-4 is the resume point of the other runs."""
    out = tmp_path_factory.mktemp(f"full_{str(request.param).split('.')[-1]}")
    trainer, rec = make_trainer(tiny_llama, out, request.param)
    trainer.train()
    return request.param, out, trainer, rec


def test_resume_mid_block_is_bit_exact(full_run, tmp_path, tiny_llama):
    dtype, out, full, full_rec = full_run
    ckpt = out / f"checkpoint-{SAVE}"
    # A freshly built model with other initial weights: everything must come from the checkpoint.
    resumed, rec = make_trainer(tiny_llama, tmp_path / "resumed", dtype, model_seed=1)
    resumed.train(resume_from_checkpoint=str(ckpt))

    assert resumed.state.global_step == MAX
    assert {s: b for s, b in full_rec.blocks.items() if s >= SAVE} == rec.blocks
    # Several blocks were visited after the resume point, the first one mid-way.
    assert len(set(rec.blocks.values())) >= 2
    full_params = dict(full.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        assert p.dtype == dtype
        assert torch.equal(p, full_params[n]), n
    # The resumed history (restored from trainer_state.json, then continued) matches, loss for loss.
    full_losses = [h["loss"] for h in full.state.log_history if "loss" in h]
    assert len(full_losses) == MAX
    assert [h["loss"] for h in resumed.state.log_history if "loss" in h] == full_losses


def test_optimizer_checkpoint_content(full_run):
    dtype, out, full, full_rec = full_run
    sd = torch.load(out / f"checkpoint-{SAVE}" / "optimizer.pt", weights_only=True)
    badam = sd["badam"]
    opt = unwrap_optimizer(full.optimizer)
    assert badam["step"] == SAVE
    assert badam["steps_in_block"] == SAVE % K == 1
    assert badam["block"] == full_rec.blocks[SAVE] == opt.schedule.block_at(SAVE)
    assert badam["block_name"] == f"model.layers.{badam['block']}"
    assert sorted(badam["order"]) == list(range(4)) and badam["order"][SAVE // K] == badam["block"]
    assert badam["seed"] == 7 and badam["switch_every"] == K and badam["switch_mode"] == "random"
    # Adam moments for the active block only; fp32 masters exist exactly when the weights are bf16.
    names = list(dict(full.model.named_parameters()))
    saved = {names[i] for i in sd["state"]}
    assert saved == {n for n in names if n.startswith(f"model.layers.{badam['block']}.")}
    for entry in sd["state"].values():
        assert {"exp_avg", "exp_avg_sq", "step"} <= set(entry)
        assert ("master" in entry) == (dtype == torch.bfloat16)
        if "master" in entry:
            assert entry["master"].dtype == torch.float32


def test_resume_without_optimizer_state_seeks_the_schedule(full_run, tmp_path, tiny_llama):
    dtype, out, full, full_rec = full_run
    ckpt = tmp_path / f"checkpoint-{SAVE}"
    shutil.copytree(out / f"checkpoint-{SAVE}", ckpt)
    (ckpt / "optimizer.pt").unlink()
    resumed, rec = make_trainer(tiny_llama, tmp_path / "resumed", dtype, max_steps=SAVE + 3)
    resumed.train(resume_from_checkpoint=str(ckpt))
    # The block (and its remaining steps) follows from the step count even without the optimizer state.
    assert rec.blocks == {s: full_rec.blocks[s] for s in range(SAVE, SAVE + 3)}
    assert unwrap_optimizer(resumed.optimizer).global_step == SAVE + 3


MODES = {
    "ratio_adjacent": f"mode=ratio,update_ratio=0.1,mask_mode=adjacent,switch_every={K},seed=7",
    "ratio_scatter": f"mode=ratio,update_ratio=0.1,mask_mode=scatter,switch_every={K},seed=7",
    "lisa": f"mode=lisa,lisa_layers=2,switch_every={K},seed=7",
    "layer_bread": f"switch_every={K},seed=7,inactive_update=sgd,inactive_lr_scale=2",
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_resumes_mid_period_bit_exact(mode, tmp_path, tiny_llama):
    """bf16 weights, checkpoint one step into the second period (masks, sample or block mid-way; ratio's
    masters of the selected entries and moments in the checkpoint): the resumed run ends bit-identical."""
    full, _ = make_trainer(tiny_llama, tmp_path / "full", torch.bfloat16, optim_args=MODES[mode])
    full.train()
    resumed, _ = make_trainer(tiny_llama, tmp_path / "resumed", torch.bfloat16, model_seed=1, optim_args=MODES[mode])
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{SAVE}"))
    sd = torch.load(tmp_path / "full" / f"checkpoint-{SAVE}" / "optimizer.pt", weights_only=True)
    assert sd["badam"]["mode"] == {"lisa": "lisa", "layer_bread": "layer"}.get(mode, "ratio")
    assert any("master" in e for e in sd["state"].values())  # mid-period: the masters were saved
    full_params = dict(full.model.named_parameters())
    initial = dict(tiny_llama(dtype=torch.bfloat16, seed=0, attention_dropout=0.0).named_parameters())
    assert any(not torch.equal(p, initial[n]) for n, p in full_params.items())
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, full_params[n]), n


def test_a_checkpoint_of_another_mode_is_refused(tmp_path, tiny_llama):
    from badam_hf import BlockOptimizer
    from badam_hf.core.errors import CheckpointMismatchError

    model = tiny_llama()
    ratio = BlockOptimizer(model, mode="ratio", update_ratio=0.1)
    sd = ratio.state_dict()
    with pytest.raises(CheckpointMismatchError, match=r"saved with mode='ratio' but this run has mode='layer'"):
        BlockOptimizer(model).load_state_dict(sd)
    with pytest.raises(CheckpointMismatchError, match=r"mode_settings=.*0.1.*this run has mode_settings=.*0.2"):
        BlockOptimizer(model, mode="ratio", update_ratio=0.2).load_state_dict(sd)
