"""Resume checks: an optimizer state from another step, another inner optimizer or another weight dtype is
refused; an unreadable optimizer file is refused with its name; a checkpoint without optimizer state resumes
with one warning that the moments and the learning-rate schedule restart."""

from __future__ import annotations

import shutil
import types
import warnings

import pytest
import torch
from transformers import Trainer, TrainingArguments

from badam_hf import BAdamTrainer, BlockOptimizer
from badam_hf.core.errors import CheckpointMismatchError, CheckpointReadError
from badam_hf.core.optimizer import unwrap_optimizer
from badam_hf.integrations.trainer import BAdamCallback

VOCAB = 64
OPTIM_ARGS = "switch_every=2,switch_mode=random,seed=7"


def data(n: int = 16, seq: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, seq), generator=g)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def make_trainer(tiny_llama, out, max_steps=6, optim_args=OPTIM_ARGS, plain=False, dtype=torch.bfloat16):
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="cosine", warmup_steps=2, save_strategy="steps", save_steps=3, report_to="none",
        use_cpu=True, logging_steps=1, disable_tqdm=True, seed=0, optim_args=optim_args,
        **({"optim": "badam"} if plain else {}),
    )
    model = tiny_llama(layers=2, dtype=dtype, seed=0, attention_dropout=0.0)
    cls = Trainer if plain else BAdamTrainer
    return cls(model=model, args=args, train_dataset=data())


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama):
    """An uninterrupted 6-step run (bf16 weights) with checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("run")
    make_trainer(tiny_llama, out).train()
    return out


def copy_checkpoint(run, tmp_path, step=3):
    ckpt = tmp_path / f"checkpoint-{step}"
    shutil.copytree(run / f"checkpoint-{step}", ckpt)
    return ckpt


def badam_warnings(caught):
    return [w for w in caught if "without optimizer state" in str(w.message)]


@pytest.mark.parametrize("plain", [False, True], ids=["BAdamTrainer", "optim_badam"])
def test_optimizer_state_of_another_step_is_refused(run, tmp_path, tiny_llama, plain):
    ckpt = copy_checkpoint(run, tmp_path)
    shutil.copy(run / "checkpoint-6" / "optimizer.pt", ckpt / "optimizer.pt")
    trainer = make_trainer(tiny_llama, tmp_path / "resumed", plain=plain)
    with pytest.raises(CheckpointMismatchError) as info:
        trainer.train(resume_from_checkpoint=str(ckpt))
    message = str(info.value)
    assert "saved at optimizer step 6" in message and "global step 3" in message
    assert str(ckpt / "optimizer.pt") in message
    assert trainer.state.global_step == 3  # refused before any step


def test_the_matching_checkpoint_still_resumes(run, tmp_path, tiny_llama):
    trainer = make_trainer(tiny_llama, tmp_path / "resumed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=str(run / "checkpoint-3"))
    assert trainer.state.global_step == 6 and not badam_warnings(caught)
    final = torch.load(run / "checkpoint-6" / "optimizer.pt", weights_only=True)
    assert unwrap_optimizer(trainer.optimizer).state_dict()["badam"]["step"] == final["badam"]["step"] == 6


def test_step_check_at_train_begin_covers_every_engine(tiny_llama):
    """The fallback for loads that bypass the file check (DeepSpeed reads its own files): the state loaded for
    this run must carry the Trainer's step."""
    opt = BlockOptimizer(tiny_llama(layers=2), switch_every=2)
    saved = BlockOptimizer(tiny_llama(layers=2), switch_every=2)
    saved.seek(6)
    opt.load_state_dict(saved.state_dict())
    assert opt.loaded_step == 6
    state = types.SimpleNamespace(global_step=3)
    callback, trainer = BAdamCallback(), types.SimpleNamespace(_badam_resume_checkpoint="out/checkpoint-3")
    callback._trainer = lambda: trainer
    with pytest.raises(CheckpointMismatchError, match=r"from out/checkpoint-3 was saved at step 6, but its "
                                                      r"trainer_state.json says global step 3"):
        callback.on_train_begin(None, state, None, optimizer=opt)


def test_changed_inner_optimizer_is_refused(run, tmp_path, tiny_llama):
    trainer = make_trainer(tiny_llama, tmp_path / "resumed", optim_args=OPTIM_ARGS + ",inner_optimizer=sgd")
    with pytest.raises(CheckpointMismatchError, match=r"inner_optimizer='AdamW' but this run has inner_optimizer='SGD'"):
        trainer.train(resume_from_checkpoint=str(run / "checkpoint-3"))


def test_inner_optimizer_is_part_of_the_state_check(tiny_llama):
    model = tiny_llama(layers=2)
    sd = BlockOptimizer(model, inner_optimizer="adam").state_dict()
    with pytest.raises(CheckpointMismatchError, match=r"inner_optimizer='Adam' but this run has inner_optimizer='AdamW'"):
        BlockOptimizer(model).load_state_dict(sd)
    BlockOptimizer(model, inner_optimizer="adam").load_state_dict(sd)  # the same one loads


def test_masters_of_bf16_weights_into_fp32_weights_are_refused(tiny_llama):
    bf16 = tiny_llama(layers=2, dtype=torch.bfloat16)
    opt = BlockOptimizer(bf16, lr=1e-2, switch_every=4)
    ids = torch.randint(0, VOCAB, (2, 8))
    bf16(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sd = opt.state_dict()
    assert any("master" in e for e in sd["state"].values())
    with pytest.raises(CheckpointMismatchError, match=r"holds an fp32 master for 'model\.layers\.0.*torch.float32"):
        BlockOptimizer(tiny_llama(layers=2), lr=1e-2, switch_every=4).load_state_dict(sd)


def test_moments_of_fp32_weights_into_bf16_weights_are_refused(tiny_llama):
    """The other way, the moments would be keyed to the weights and lost when the masters are made."""
    fp32 = tiny_llama(layers=2)
    opt = BlockOptimizer(fp32, lr=1e-2, switch_every=4)
    ids = torch.randint(0, VOCAB, (2, 8))
    fp32(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(CheckpointMismatchError, match=r"lacks an fp32 master for 'model\.layers\.0.*torch.bfloat16"):
        BlockOptimizer(tiny_llama(layers=2, dtype=torch.bfloat16), lr=1e-2, switch_every=4).load_state_dict(sd)


@pytest.mark.parametrize("remove", ["optimizer.pt", "scheduler.pt"])
def test_missing_optimizer_state_warns_once(run, tmp_path, tiny_llama, remove):
    ckpt = copy_checkpoint(run, tmp_path)
    (ckpt / remove).unlink()
    trainer = make_trainer(tiny_llama, tmp_path / "resumed", max_steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=str(ckpt))
    found = badam_warnings(caught)
    assert len(found) == 1
    message = str(found[0].message)
    assert str(ckpt / remove) in message
    assert "Adam moments restart" in message and "learning-rate schedule restarts" in message
    assert "resume at step 3" in message
    assert unwrap_optimizer(trainer.optimizer).global_step == 4  # the block schedule still resumed


def _damage(path, how):
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_unreadable_optimizer_file_is_named(run, tmp_path, tiny_llama, how):
    ckpt = copy_checkpoint(run, tmp_path)
    _damage(ckpt / "optimizer.pt", how)
    trainer = make_trainer(tiny_llama, tmp_path / "resumed")
    with pytest.raises(CheckpointReadError) as info:
        trainer.train(resume_from_checkpoint=str(ckpt))
    message = str(info.value)
    assert str(ckpt / "optimizer.pt") in message
    assert "Resume from an earlier checkpoint" in message and f"delete {ckpt / 'optimizer.pt'}" in message


@pytest.fixture
def one_process_group(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("how", ["empty", "garbage"])
def test_unreadable_fsdp2_rank_file_is_named(one_process_group, tmp_path, tiny_llama, how):
    from badam_hf.engines.fsdp2 import load_sharded_optimizer, save_sharded_optimizer

    opt = BlockOptimizer(tiny_llama(layers=2), switch_every=2)
    path = save_sharded_optimizer(opt, str(tmp_path))
    load_sharded_optimizer(BlockOptimizer(tiny_llama(layers=2), switch_every=2), str(tmp_path))  # intact: loads
    _damage(tmp_path / "optimizer_badam" / "rank0-of-1.pt", how)
    with pytest.raises(CheckpointReadError) as info:
        load_sharded_optimizer(BlockOptimizer(tiny_llama(layers=2), switch_every=2), str(tmp_path))
    assert path in str(info.value) and "delete the folder" in str(info.value)


def test_unreadable_deepspeed_rank_file_is_named(tmp_path):
    from badam_hf.engines.deepspeed import DeepSpeedBlockSync

    (tmp_path / "global_step3").mkdir()
    bad = tmp_path / "global_step3" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointReadError, match="bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        DeepSpeedBlockSync._saved_step(None, str(tmp_path), "global_step3")
