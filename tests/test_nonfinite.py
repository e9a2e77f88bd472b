"""Non-finite steps: an inf/NaN gradient in the active block skips the step (weights, masters and moments
bit-identical), is counted and logged; `max_skipped_steps` skips in a row stop training; the decision is
shared by all ranks through the engine's flag reduce; `skip_nonfinite=false` turns it off."""

from __future__ import annotations

import logging
import math
import types

import pytest
import torch

from badam_hf import BAdamTrainer, BlockOptimizer
from badam_hf.core.config import BAdamConfig
from badam_hf.core.errors import BAdamConfigError, NonFiniteGradientError
from badam_hf.core.optimizer import unwrap_optimizer
from badam_hf.integrations.trainer import BAdamCallback

VOCAB = 64


def ids_for(step: int, micro: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(100 * step + micro))


def snapshot(model, opt) -> dict:
    """Weights, and the optimizer's masters and moments (state_dict rebuilds split masters without joining)."""
    sd = opt.state_dict()
    return {
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "state": {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in e.items()} for i, e in sd["state"].items()},
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    for n in a["weights"]:
        assert torch.equal(a["weights"][n], b["weights"][n]), n
    assert a["state"].keys() == b["state"].keys() and a["state"]
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for k, v in a["state"][i].items():
            assert torch.equal(v, b["state"][i][k]) if torch.is_tensor(v) else v == b["state"][i][k], (i, k)


def train_step(model, opt, step, nan_micro=None, ga=2, boundary=False):
    """One optimizer step over `ga` micro-batches; `boundary`: with the check a plain loop with accumulation
    registers (the last micro-batch is the one that steps)."""
    current = {"micro": 0}
    handle = opt.register_boundary_check(lambda: current["micro"] == ga - 1) if boundary else None
    for micro in range(ga):
        current["micro"] = micro
        ids = ids_for(step, micro)
        loss = model(input_ids=ids, labels=ids).loss / ga
        if micro == nan_micro:
            loss = loss * float("nan")
        loss.backward()
    if handle is not None:
        handle.remove()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("dtype,split", [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, True)],
                         ids=["bf16_split", "bf16_whole", "fp32"])
def test_nan_in_one_micro_batch_leaves_the_block_bit_identical(tiny_llama, dtype, split, caplog):
    model = tiny_llama(layers=2, dtype=dtype)
    opt = BlockOptimizer(model, lr=1e-2, switch_every=4, switch_mode="ascending", split_masters=split)
    train_step(model, opt, 0)
    train_step(model, opt, 1)
    before = snapshot(model, opt)
    with caplog.at_level(logging.WARNING, logger="badam_hf"):
        train_step(model, opt, 2, nan_micro=1)
    assert_same(before, snapshot(model, opt))
    assert opt.skipped_steps == 1 and opt.global_step == 3  # counted towards K
    assert any("skipped optimizer step (step 3, block 'model.layers.0')" in r.getMessage()
               and "counts towards switch_every" in r.getMessage() for r in caplog.records)
    # Training goes on: the next step moves the block again, and a skip is no switch by itself.
    train_step(model, opt, 3)
    after = snapshot(model, opt)
    assert any(not torch.equal(after["weights"][n], before["weights"][n]) for n in before["weights"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.active_block == 1 and opt.global_step == 4


def test_skipped_step_matches_a_run_without_that_step(tiny_llama):
    """A skipped step changes nothing: the run equals one whose step 1 simply never happened (same schedule:
    the skipped step counts towards K in both)."""
    runs = []
    for nan in (True, False):
        model = tiny_llama(layers=2, dtype=torch.bfloat16)
        opt = BlockOptimizer(model, lr=1e-2, switch_every=3, switch_mode="ascending")
        train_step(model, opt, 0)
        if nan:
            train_step(model, opt, 1, nan_micro=0)
        else:
            opt.zero_grad()
            opt.advance()
        for step in (2, 3, 4):
            train_step(model, opt, step)
        runs.append(snapshot(model, opt))
    assert_same(*runs)


def test_persistent_nan_stops_with_the_step_and_block(tiny_llama):
    model = tiny_llama(layers=2)
    opt = BlockOptimizer(model, lr=1e-2, switch_every=2, switch_mode="ascending", max_skipped_steps=3)
    train_step(model, opt, 0)
    train_step(model, opt, 1, nan_micro=0)  # one skip, then a good step resets the count
    train_step(model, opt, 2)
    train_step(model, opt, 3, nan_micro=0)
    train_step(model, opt, 4, nan_micro=0)
    with pytest.raises(NonFiniteGradientError, match=r"3 optimizer steps in a row had inf/NaN gradients \(the last at "
                                                     r"step 6, block 'model.layers.0'\).*max_skipped_steps=3.*learning rate"):
        train_step(model, opt, 5, nan_micro=0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.skipped_steps == 4


def test_skip_nonfinite_false_steps_regardless(tiny_llama):
    model = tiny_llama(layers=2)
    opt = BlockOptimizer(model, lr=1e-2, switch_every=4, skip_nonfinite=False)
    train_step(model, opt, 0, nan_micro=0)
    assert opt.skipped_steps == 0
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_a_finite_gradient_whose_2_norm_overflows_is_not_skipped(tiny_llama):
    """The fast check (a 2-norm per tensor) overflows for a finite gradient past about 1e19; the exact check
    (largest |g|) then decides, so such a step is taken, and an inf beside it is still found."""
    model = tiny_llama(layers=2)
    opt = BlockOptimizer(model, lr=1e-2, switch_every=4)
    flags = []
    opt.register_flag_reduce(lambda flag: flags.append(float(flag)))
    name = opt.trainable_names[0]
    p = model.get_parameter(name)
    for value, finite in ((1e30, True), (float("inf"), False)):
        flags.clear()
        for n in opt.trainable_names:
            model.get_parameter(n).grad = torch.zeros_like(model.get_parameter(n))
        p.grad.view(-1)[3] = value
        assert not math.isfinite(torch.linalg.vector_norm(p.grad.float()).item())  # the fast check overflows
        assert opt.grads_finite() is finite
        assert flags == [1.0, 0.0 if finite else 1.0]  # the exact check ran after the fast one
    before = p.detach().clone()
    p.grad.normal_().view(-1)[3] = 1e30  # Adam moves every entry (the huge one's update is ~0: v overflows)
    opt.step()
    assert opt.skipped_steps == 0 and not torch.equal(p.detach(), before)


def test_the_ranks_verdict_decides(tiny_llama):
    """The engine's flag reduce (max over ranks) decides: a rank whose own gradients are finite skips when
    another rank saw inf/NaN, so no rank ever steps alone."""
    model = tiny_llama(layers=2)
    opt = BlockOptimizer(model, lr=1e-2, switch_every=4)
    seen = []

    def other_rank_saw_nan(flag):
        seen.append(float(flag))
        flag.fill_(1.0)

    handle = opt.register_flag_reduce(other_rank_saw_nan)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, opt, 0)
    # this rank's own flag is 0 in both checks (the fast one and the exact one the reduced flag calls for)
    assert seen == [0.0, 0.0] and opt.skipped_steps == 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    handle.remove()
    train_step(model, opt, 1)
    assert opt.skipped_steps == 1 and any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_ddp_sync_reduces_the_flag_over_its_group(tiny_llama, tmp_path):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from badam_hf.distributed import attach_ddp

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = tiny_llama(layers=2)
        opt = BlockOptimizer(model, lr=1e-2, switch_every=4)
        sync = attach_ddp(DDP(model), opt)
        assert list(opt._flag_reducers.values()) == [sync.reduce_max]
        flag = torch.ones(())
        sync.reduce_max(flag)  # one rank: the max is its own
        assert float(flag) == 1.0
    finally:
        torch.distributed.destroy_process_group()


class NaNAt(BAdamTrainer):
    """Loss times NaN in the first micro-batch of the optimizer steps in `nan_steps`."""

    nan_steps: set = set()

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        self._micro = getattr(self, "_micro", -1) + 1
        if self.state.global_step in self.nan_steps and self._micro % self.args.gradient_accumulation_steps == 0:
            loss = loss * float("nan")
        return loss


class Weights:
    def __init__(self):
        self.before, self.after = {}, {}

    def on_step_begin(self, args, state, control, model=None, **kw):
        self.before[state.global_step] = [p.detach().clone() for p in model.parameters()]

    def on_step_end(self, args, state, control, model=None, **kw):
        self.after[state.global_step - 1] = [p.detach().clone() for p in model.parameters()]


def trainer_with_nan(tiny_llama, tmp_path, nan_steps, max_steps=5, optim_args="switch_every=2,switch_mode=ascending"):
    from transformers import TrainerCallback, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-2, report_to="none", use_cpu=True, logging_steps=1, disable_tqdm=True, seed=0,
        save_strategy="no", optim_args=optim_args,
    )
    ids = torch.randint(0, VOCAB, (32, 8), generator=torch.Generator().manual_seed(0))
    recorder = type("Recorder", (Weights, TrainerCallback), {})()
    cls = type("T", (NaNAt,), {"nan_steps": set(nan_steps)})
    trainer = cls(model=tiny_llama(layers=2, dtype=torch.bfloat16), args=args,
                  train_dataset=[{"input_ids": x, "labels": x.clone()} for x in ids], callbacks=[recorder])
    return trainer, recorder


def test_trainer_skips_and_logs_the_step(tiny_llama, tmp_path):
    trainer, rec = trainer_with_nan(tiny_llama, tmp_path, nan_steps={2})
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(rec.before[2], rec.after[2]))  # the NaN step changed nothing
    assert any(not torch.equal(a, b) for a, b in zip(rec.before[3], rec.after[3]))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [(h["step"], h["badam/skipped_steps"]) for h in logs] == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1)]
    opt = unwrap_optimizer(trainer.optimizer)
    assert opt.global_step == trainer.state.global_step == 5  # the skipped step counted, like the Trainer's
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_trainer_stops_on_persistent_nan(tiny_llama, tmp_path):
    trainer, _ = trainer_with_nan(tiny_llama, tmp_path, nan_steps={1, 2, 3, 4}, max_steps=6,
                                  optim_args="switch_every=2,switch_mode=ascending,max_skipped_steps=3")
    with pytest.raises(NonFiniteGradientError, match=r"3 optimizer steps in a row.*step 4, block 'model.layers.1'"):
        trainer.train()
    assert trainer.state.global_step == 3


def test_a_loss_scaler_skip_keeps_the_schedule_on_the_trainers_step(tiny_llama):
    """fp16 loss scaling skips a step without calling BlockOptimizer.step(); the Trainer counts it all the same,
    so the block schedule does too (not one of BAdam's skipped steps)."""
    opt = BlockOptimizer(tiny_llama(layers=2), switch_every=2, switch_mode="ascending")
    opt.advance()
    callback = BAdamCallback()
    trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(optimizer_step_was_skipped=True))
    callback._trainer = lambda: trainer
    callback.on_optimizer_step(None, types.SimpleNamespace(global_step=1), None, optimizer=opt)
    assert opt.global_step == 2 and opt.active_block == 1 and opt.skipped_steps == 0
    # A step that did reach the optimizer is not counted twice.
    callback.on_optimizer_step(None, types.SimpleNamespace(global_step=1), None, optimizer=opt)
    assert opt.global_step == 2


def test_config_keys():
    cfg = BAdamConfig.from_optim_args("skip_nonfinite=false,max_skipped_steps=3")
    assert cfg.skip_nonfinite is False and cfg.max_skipped_steps == 3
    assert BAdamConfig().skip_nonfinite is True and BAdamConfig().max_skipped_steps == 10
    with pytest.raises(BAdamConfigError, match=r"max_skipped_steps=0 is not valid.*integer >= 1"):
        BAdamConfig.from_optim_args("max_skipped_steps=0")
    with pytest.raises(BAdamConfigError, match=r"skip_nonfinite='maybe'.*true/false"):
        BAdamConfig.from_optim_args("skip_nonfinite=maybe")


@pytest.mark.multiprocess
def test_ddp_ranks_take_the_same_decision(tmp_path):
    """Two DDP ranks, a NaN written into rank 0's reduced gradient only: both skip and stay identical; without
    the flag reduce (control) rank 1 steps alone and the replicas part."""
    from pathlib import Path

    from dist_common import launch, load, read, same

    launch(str(Path(__file__).parent / "dist_workers" / "nonfinite_worker.py"), str(tmp_path), timeout=150)
    for name in ("agree", "agree_bf16"):
        r0, r1 = read(tmp_path, f"{name}_rank0"), read(tmp_path, f"{name}_rank1")
        assert r0 == r1 == {"skipped": 1, "step": 4, "block": 2, "skipped_step_unchanged": True}, name
        assert same(load(tmp_path, f"{name}_rank0"), load(tmp_path, f"{name}_rank1")), name
    c0, c1 = read(tmp_path, "control_rank0"), read(tmp_path, "control_rank1")
    assert (c0["skipped"], c1["skipped"], c0["skipped_step_unchanged"], c1["skipped_step_unchanged"]) == (
        1, 0, True, False)
    assert not same(load(tmp_path, "control_rank0"), load(tmp_path, "control_rank1"))


@pytest.mark.parametrize("split", [True, False], ids=["split", "whole"])
def test_a_skip_at_the_blocks_last_step_still_writes_back_with_switch_rounding(tiny_llama, split):
    """The skipped step is the block's K-th: the switch drops the masters right after it, so the unchanged
    masters are written into the weights with switch_rounding there (stochastic, keyed by that step), exactly
    as a step taken there would write its own."""
    from badam_hf.core.rounding import SWITCH_STREAM, rounding_key, store_stochastic

    model = tiny_llama(layers=2, dtype=torch.bfloat16)
    opt = BlockOptimizer(model, lr=1e-2, switch_every=2, switch_mode="ascending", switch_rounding="stochastic",
                         split_masters=split)
    train_step(model, opt, 0, ga=1)
    block = list(opt.trainable_names)
    masters = {n: opt._block_masters.value(n).clone() for n in block}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, opt, 1, nan_micro=0, ga=1)  # step 2 = the block's last: skipped
    assert opt.skipped_steps == 1 and opt.active_block == 1 and opt.memory_bytes()["masters"] == 0
    params = dict(model.named_parameters())
    moved = 0
    for n in block:
        expected = weights[n].clone()
        store_stochastic(expected, masters[n], None, rounding_key(opt.config.schedule.seed, 2,
                                                                    opt._index[n], SWITCH_STREAM))
        assert torch.equal(params[n].detach(), expected), n
        moved += int((expected != weights[n]).sum())
    assert moved > 0  # the stochastic write differs from the nearest weights the split left
    for n, w in weights.items():
        if n not in block:
            assert torch.equal(params[n].detach(), w), n


# --- BREAD: a skipped step leaves the inactive layers bit-identical too ----------------------------------------


@pytest.mark.parametrize("scope", ["above", "all"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_nan_batch_with_inactive_update_leaves_every_weight_bit_identical(tiny_llama, scope, dtype):
    """A NaN in the first micro-batch used to be stepped into the inactive layers inside the backward while
    the log said the step was skipped. The inactive step now runs after the finite check."""
    model = tiny_llama(layers=3, dtype=dtype)
    opt = BlockOptimizer(model, lr=1e-2, switch_every=4, switch_mode="ascending", inactive_update="sgd",
                         inactive_scope=scope)
    train_step(model, opt, 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, opt, 1, nan_micro=0)
    assert opt.skipped_steps == 1
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        assert p.grad is None, n
    train_step(model, opt, 2)  # and the next step trains the inactive layers again
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model.lm_head.weight.detach(), before["lm_head.weight"])


def test_a_nan_in_an_inactive_gradient_alone_skips_the_step(tiny_llama):
    """The finite check covers the inactive gradients: a NaN that reaches only an inactive layer's gradient
    skips the whole step (the active block's gradient is finite)."""
    model = tiny_llama(layers=3, dtype=torch.bfloat16)
    opt = BlockOptimizer(model, lr=1e-2, switch_every=4, switch_mode="ascending", inactive_update="signsgd")
    target = model.model.layers[2].mlp.up_proj.weight
    assert "model.layers.2.mlp.up_proj.weight" in opt.inactive_names
    handle = target.register_hook(lambda g: torch.full_like(g, float("nan")))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, opt, 0, ga=1)
    handle.remove()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("timing", ["step", "backward"])
def test_trainer_nan_step_with_inactive_update_changes_no_weight(tiny_llama, tmp_path, timing):
    """Through the Trainer. With timing `backward` its sync_gradients marks the stepping micro-batch: the NaN of
    the first micro-batch accumulates into the inactive gradients, which the last backward finds non-finite."""
    trainer, rec = trainer_with_nan(tiny_llama, tmp_path, nan_steps={2},
                                    optim_args="switch_every=2,switch_mode=ascending,inactive_update=sgd,"
                                               f"inactive_scope=all,inactive_timing={timing}")
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(rec.before[2], rec.after[2]))
    assert any(not torch.equal(a, b) for a, b in zip(rec.before[3], rec.after[3]))
    assert unwrap_optimizer(trainer.optimizer).skipped_steps == 1


def test_fp16_loss_scaling_with_inactive_update_is_refused(tiny_llama):
    """The scaler unscales and inf-checks only the optimizer's param groups (the active block): the inactive
    step would be `scale` times too large. Refused at train begin (and by BAdamTrainer with --fp16)."""
    opt = BlockOptimizer(tiny_llama(layers=2), inactive_update="sgd")
    callback = BAdamCallback()
    trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(scaler=object()), model_wrapped=None)
    callback._trainer = lambda: trainer
    with pytest.raises(BAdamConfigError, match=r"inactive_update='sgd' cannot train with fp16 loss scaling.*--bf16"):
        callback.on_train_begin(None, types.SimpleNamespace(global_step=0, max_steps=4), None, optimizer=opt)
    plain = BlockOptimizer(tiny_llama(layers=2))  # without inactive_update fp16 stays allowed
    callback.on_train_begin(None, types.SimpleNamespace(global_step=0, max_steps=4), None, optimizer=plain)


def test_fp16_with_inactive_update_is_refused_when_the_arguments_are_parsed(tmp_path):
    """`--optim badam --optim_args inactive_update=sgd --fp16` is refused by TrainingArguments itself, before a
    model or dataset is loaded; without --fp16, or without inactive_update, the same arguments are accepted."""
    from transformers import TrainingArguments

    def args(**kw):
        return TrainingArguments(output_dir=str(tmp_path), optim="badam", report_to=[], use_cpu=True, **kw)

    with pytest.raises(BAdamConfigError, match=r"inactive_update='sgd' cannot train with fp16 loss scaling.*--bf16"):
        args(fp16=True, optim_args="inactive_update=sgd")
    assert args(fp16=True, optim_args="switch_every=2").fp16
    assert args(bf16=True, optim_args="inactive_update=sgd").bf16


# --- BREAD with inactive_timing=backward: checked in the backward, no NaN reaches a weight ---------------------



@pytest.mark.parametrize("scope", ["above", "all"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("ga,nan_micro", [(1, 0), (2, 0), (2, 1)], ids=["ga1", "ga2_first", "ga2_last"])
def test_nan_batch_with_backward_timing_leaves_every_weight_bit_identical(tiny_llama, scope, dtype, ga, nan_micro):
    """A NaN loss makes the first inactive gradient of the stepping backward NaN (or the accumulated ones, when
    the NaN came in an earlier micro-batch): every inactive update of that backward lands as zero and step()
    skips the step; the active block's weights, masters and moments are unchanged."""
    model = tiny_llama(layers=3, dtype=dtype)
    opt = BlockOptimizer(model, lr=1e-2, switch_every=4, switch_mode="ascending", inactive_update="sgd",
                         inactive_scope=scope, inactive_timing="backward")
    train_step(model, opt, 0, ga=ga, boundary=True)
    before = snapshot(model, opt)
    train_step(model, opt, 1, nan_micro=nan_micro, ga=ga, boundary=True)
    assert opt.skipped_steps == 1 and opt.global_step == 2
    assert_same(before, snapshot(model, opt))
    assert all(p.grad is None for p in model.parameters())
    train_step(model, opt, 2, ga=ga, boundary=True)  # the verdict was the skipped step's only: training goes on
    assert opt.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model.lm_head.weight.detach(), before["weights"]["lm_head.weight"])


def test_a_nan_in_one_inactive_gradient_mid_backward_stops_the_updates_after_it(tiny_llama):
    """A NaN planted in one inactive gradient (the active block's are finite): that tensor and every inactive
    tensor whose gradient completes after it in the backward keep their weights; those stepped earlier in the
    same backward keep their update (documented); nothing holds a NaN; step() skips the step."""
    model = tiny_llama(layers=3, dtype=torch.float32)
    opt = BlockOptimizer(model, lr=1e-2, switch_every=4, switch_mode="ascending", inactive_update="sgd",
                         inactive_timing="backward")
    train_step(model, opt, 0, ga=1)
    names = {p: n for n, p in model.named_parameters()}
    order = []  # the inactive tensors in the order the backward completes them (hooks after the optimizer's)
    handles = [model.get_parameter(n).register_post_accumulate_grad_hook(lambda p: order.append(names[p]))
               for n in opt.inactive_names]
    target = "model.layers.2.mlp.up_proj.weight"
    handles.append(model.get_parameter(target).register_hook(lambda g: torch.full_like(g, float("nan"))))
    before = snapshot(model, opt)
    train_step(model, opt, 1, ga=1)
    for h in handles:
        h.remove()
    assert sorted(order) == sorted(opt.inactive_names)
    k = order.index(target)
    assert 0 < k < len(order) - 1  # tensors on both sides of it
    assert opt.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    w = {n: p.detach() for n, p in model.named_parameters()}
    for n in order[:k]:
        assert not torch.equal(w[n], before["weights"][n]), n
    for n in order[k:]:
        assert torch.equal(w[n], before["weights"][n]), n
    for n in opt.trainable_names:  # the active block: as it was, masters and moments too
        assert torch.equal(w[n], before["weights"][n]), n
    after = snapshot(model, opt)
    assert after["state"].keys() == before["state"].keys()
    for i in before["state"]:
        assert all(torch.equal(v, after["state"][i][key]) for key, v in before["state"][i].items()
                   if torch.is_tensor(v)), i


def test_fp16_loss_scaling_with_backward_timing_is_refused_naming_it(tiny_llama):
    opt = BlockOptimizer(tiny_llama(layers=2), inactive_update="signsgd", inactive_timing="backward")
    callback = BAdamCallback()
    trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(scaler=object()), model_wrapped=None)
    callback._trainer = lambda: trainer
    message = (r"inactive_update='signsgd' cannot train with fp16 loss scaling \(--fp16\): with "
               r"inactive_timing='backward'.*inside the backward.*--bf16")
    with pytest.raises(BAdamConfigError, match=message):
        callback.on_train_begin(None, types.SimpleNamespace(global_step=0, max_steps=4), None, optimizer=opt)
