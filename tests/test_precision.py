"""Precision handling of BlockOptimizer: bf16 weights with fp32 masters, fp16 weights refused, fp32 weights
with fp16 loss scaling (GradScaler skips count for nothing)."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import Trainer

from badam_hf.core.config import BAdamConfigError
from badam_hf.core.optimizer import BlockOptimizer
import tiny_models
from tiny_models import active_names, snapshot



batch = functools.partial(tiny_models.batch, offset=2000)


def bf16_ties_toward_zero(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bf16 the way split_masters writes weights: to nearest, ties toward zero."""
    bits = x.view(torch.int32)
    up = torch.bitwise_and(bits, 0xFFFF) > 0x8000
    return (torch.bitwise_right_shift(bits, 16) + up).to(torch.int16).view(torch.bfloat16)


# --- bf16 weights ------------------------------------------------------------------------------------


def test_bf16_masters_match_fp32_adamw_reference(tiny_llama):
    """The fp32 masters follow exactly the trajectory of torch AdamW (the same fused kernel) run in fp32 on the
    same gradients, and the bf16 weights are the masters rounded to bf16. The gradients arrive in fp32 on the
    masters during backward: no bf16 gradient is left on the weights."""
    K, lr, wd = 3, 1e-3, 0.1
    model = tiny_llama(dtype=torch.bfloat16)
    # nearest: the weights are the masters rounded to nearest, also at the switch (stochastic: test_rounding)
    opt = BlockOptimizer(model, lr=lr, weight_decay=wd, switch_every=K, switch_mode="ascending",
                         switch_rounding="nearest")
    params = dict(model.named_parameters())
    decay = set(Trainer.get_decay_parameter_names(None, model))
    step = 0
    for block in range(2):  # two blocks: the second starts from fresh masters of the updated weights
        names = active_names(opt)
        assert opt.active_block == block
        # A block's master is made at its first step, as the exact upcast of the weights.
        refs = {n: params[n].detach().float() for n in names}
        ref_opt = torch.optim.AdamW(
            [
                {"params": [refs[n] for n in names if n in decay], "weight_decay": wd},
                {"params": [refs[n] for n in names if n not in decay], "weight_decay": 0.0},
            ],
            lr=lr, fused=True,
        )
        masters = {}  # as the inner step leaves them (after it, they are kept as their low 16 bits: split_masters)
        grab = opt.inner.register_step_post_hook(
            lambda o, a, k: masters.update({n: opt.masters[n].clone() for n in names}))
        for _ in range(K):
            ids = batch(step)
            model(input_ids=ids, labels=ids).loss.backward()
            for n in names:
                assert params[n].grad is None
                assert opt.master_grads[n].dtype == torch.float32
                refs[n].grad = opt.master_grads[n].clone()
            before = snapshot(model)
            opt.step()
            opt.zero_grad()
            ref_opt.step()
            for n in names:
                assert masters[n].dtype == torch.float32
                assert torch.equal(masters[n], refs[n]), (step, n)
                assert params[n].dtype == torch.bfloat16
                # Masters kept split round ties toward zero; at a block's last step (dropped after it) torch's.
                last = step % K == K - 1
                want = refs[n].to(torch.bfloat16) if last else bf16_ties_toward_zero(refs[n])
                assert torch.equal(params[n], want), (step, n)
            for n, p in params.items():
                assert p.dtype == torch.bfloat16
                if n not in names:
                    assert torch.equal(p, before[n]), (step, n)
            # Masters keep sub-bf16 precision: some differ from their weights rounded to bf16.
            assert any(not torch.equal(masters[n], params[n].float()) for n in names), step
            step += 1
        grab.remove()


def test_bf16_loss_falls_when_overfitting(tiny_llama):
    model = tiny_llama(dtype=torch.bfloat16)
    opt = BlockOptimizer(model, lr=1e-2, switch_every=5, switch_mode="ascending")
    ids = batch(0, bs=4, seq=16)
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert opt.global_step == 20 and opt.active_block == 0  # all four blocks trained, back to block 0
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert losses[-1] < losses[0] - 0.4, losses


def test_fp16_weights_are_refused(tiny_llama):
    model = tiny_llama(dtype=torch.float16)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(BAdamConfigError, match=r"float16 weights.*bfloat16"):
        BlockOptimizer(model)
    assert [p.requires_grad for p in model.parameters()] == flags


# --- fp32 weights with fp16 loss scaling -------------------------------------------------------------


def _cpu_grad_scaler(**kwargs):
    if not hasattr(torch, "amp") or not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler is not available")
    try:
        return torch.amp.GradScaler("cpu", **kwargs)
    except Exception as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"GradScaler('cpu') is not available: {e}")


def test_grad_scaler_steps_equal_unscaled_steps(tiny_llama):
    """Scaling by a power of two is exact, so a scaled run equals an unscaled one bit for bit."""
    scaler = _cpu_grad_scaler(init_scale=2.0**12)
    scaled_model, plain_model = tiny_llama(), tiny_llama()
    scaled = BlockOptimizer(scaled_model, lr=1e-3, switch_every=2, switch_mode="ascending")
    plain = BlockOptimizer(plain_model, lr=1e-3, switch_every=2, switch_mode="ascending")
    for t in range(3):
        ids = batch(t)
        before = snapshot(scaled_model)
        active = set(active_names(scaled))
        scaler.scale(scaled_model(input_ids=ids, labels=ids).loss).backward()
        scaler.step(scaled)
        scaler.update()
        scaled.zero_grad()
        plain_model(input_ids=ids, labels=ids).loss.backward()
        plain.step()
        plain.zero_grad()
        for (n, p), q in zip(scaled_model.named_parameters(), plain_model.parameters()):
            assert torch.equal(p, q), (t, n)
            assert torch.equal(p, before[n]) == (n not in active), (t, n)
    assert scaled.global_step == 3 and scaled.active_block == 1
    assert scaler.get_scale() == 2.0**12


def test_grad_scaler_with_fp16_autocast_trains(tiny_llama):
    scaler = _cpu_grad_scaler(init_scale=2.0**10)
    model = tiny_llama()
    opt = BlockOptimizer(model, lr=1e-3, switch_every=2, switch_mode="ascending")
    for t in range(2):
        before = snapshot(model)
        active = set(active_names(opt))
        ids = batch(t)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        for n, p in model.named_parameters():
            assert p.dtype == torch.float32
            assert torch.equal(p, before[n]) == (n not in active), (t, n)
    assert opt.global_step == 2 and opt.active_block == 1


def test_grad_scaler_skipped_step_changes_nothing(tiny_llama):
    K = 2
    scaler = _cpu_grad_scaler(init_scale=2.0**10)
    model = tiny_llama()
    opt = BlockOptimizer(model, lr=1e-3, switch_every=K, switch_mode="ascending")

    def scaled_backward(t, inject_inf=False):
        ids = batch(t)
        scaler.scale(model(input_ids=ids, labels=ids).loss).backward()
        if inject_inf:
            p = opt.param_groups[0]["params"][0]
            p.grad.view(-1)[0] = float("inf")

    # One good step on block 0.
    scaled_backward(0)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    assert (opt.global_step, opt.steps_in_block, opt.active_block) == (1, 1, 0)

    # An overflowing step: skipped, so weights, step count and block position stay where they were.
    before = snapshot(model)
    state_steps = {id(k): v["step"].clone() for k, v in opt.inner.state.items()}
    scaled_backward(1, inject_inf=True)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert (opt.global_step, opt.steps_in_block, opt.active_block) == (1, 1, 0)
    assert {id(k): v["step"] for k, v in opt.inner.state.items()} == state_steps
    assert scaler.get_scale() == 2.0**9  # the scaler backed off

    # The next good step is block 0's K-th successful step: it trains block 0, then switches.
    active0 = set(active_names(opt))
    before = snapshot(model)
    scaled_backward(2)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in active0), n
    assert (opt.global_step, opt.steps_in_block, opt.active_block) == (2, 0, 1)
