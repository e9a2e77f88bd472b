"""Masters held split and gradients straight into fp32.

Gradients straight into fp32: for bf16 weights each active gradient moves to its fp32 master as autograd
produces it (a post-accumulate-grad hook), accumulates there across micro-batches, and gradient clipping
(plain loop and HF Trainer) sees those fp32 gradients. `fp32_grad_accumulation=false` switches back."""

from __future__ import annotations

import functools

import torch
from transformers import TrainingArguments

from badam_hf import BAdamConfig, BAdamTrainer, BlockOptimizer
import tiny_models
from tiny_models import active_names



batch = functools.partial(tiny_models.batch, offset=3000)
backward = functools.partial(tiny_models.backward, offset=3000)


def test_no_bf16_gradient_survives_backward(tiny_llama):
    model = tiny_llama(dtype=torch.bfloat16)
    opt = BlockOptimizer(model, lr=1e-3, switch_every=2, switch_mode="ascending", start_block=1)
    backward(model, 0)
    names = active_names(opt)
    params = dict(model.named_parameters())
    for n, p in params.items():
        assert p.grad is None, n  # active ones moved to fp32, inactive ones never had one
    assert not opt.masters  # made at the block's first step: during its first forward/backward there is none
    grads = [opt.master_grads[n] for n in names]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    # One buffer holds them all: 4 bytes per active element, nothing else.
    assert len({g.untyped_storage().data_ptr() for g in grads}) == 1
    numel = sum(params[n].numel() for n in names)
    assert grads[0].untyped_storage().nbytes() == 4 * numel
    assert opt.memory_bytes()["grads"] == 4 * numel
    opt.step()
    assert set(opt.masters) == set(names) and all(m.grad is None for m in opt.masters.values())
    assert opt.memory_bytes()["grads"] == 0 and opt.master_grads == {}


def test_switch_back_keeps_bf16_gradients_until_the_step(tiny_llama):
    model = tiny_llama(dtype=torch.bfloat16)
    opt = BlockOptimizer(model, lr=1e-3, switch_every=2, fp32_grad_accumulation=False)
    backward(model, 0)
    params = dict(model.named_parameters())
    for n in active_names(opt):
        assert params[n].grad is not None and params[n].grad.dtype == torch.bfloat16
    assert opt.master_grads == {}
    assert BAdamConfig.from_optim_args("fp32_grad_accumulation=false").fp32_grad_accumulation is False


def test_gradient_accumulation_in_fp32_is_closer_to_exact_than_bf16(tiny_llama):
    """GA=8 on bf16 weights: the fp32 path equals the fp32 sum of the micro-batch gradients autograd made, and
    is far closer to their exact (float64) sum than autograd's bf16 accumulation."""
    GA = 8
    hooked, plain, single = (tiny_llama(dtype=torch.bfloat16) for _ in range(3))
    opts = [BlockOptimizer(m, lr=1e-3, switch_every=4, start_block=0, fp32_grad_accumulation=f)
            for m, f in ((hooked, True), (plain, False), (single, False))]
    names = active_names(opts[0])
    micro = {n: [] for n in names}  # each micro-batch's bf16 gradient, as autograd produces it
    for i in range(GA):
        for m in (hooked, plain, single):
            backward(m, i, scale=1.0 / GA)
        for n, p in single.named_parameters():
            if n in micro:
                micro[n].append(p.grad.clone())
        single.zero_grad(set_to_none=True)
    plain_params = dict(plain.named_parameters())
    err_fp32 = err_bf16 = norm = 0.0
    for n in names:
        exact = torch.stack([g.double() for g in micro[n]]).sum(0)
        fp32_sum = micro[n][0].float()
        for g in micro[n][1:]:
            fp32_sum = fp32_sum + g.float()
        got = opts[0].master_grads[n]
        assert torch.equal(got, fp32_sum), n
        err_fp32 += (got.double() - exact).pow(2).sum().item()
        err_bf16 += (plain_params[n].grad.double() - exact).pow(2).sum().item()
        norm += exact.pow(2).sum().item()
    rel_fp32, rel_bf16 = (err_fp32 / norm) ** 0.5, (err_bf16 / norm) ** 0.5
    print(f"GA={GA}: relative error of the accumulated gradient: fp32 {rel_fp32:.2e}, bf16 {rel_bf16:.2e}")
    assert rel_bf16 > 1e-3  # bf16 accumulation loses bits (about 2^-9 relative per add)
    assert rel_fp32 < rel_bf16 / 100


def test_clip_grad_norm_clips_the_fp32_gradients(tiny_llama):
    """opt.clip_grad_norm_ (and HF's clipping through it) clips the fp32 master gradients: the update equals
    SGD on the clipped fp32 gradients exactly. Clipping model.parameters() would see no gradient at all."""
    lr, max_norm = 0.5, 1e-2
    model = tiny_llama(dtype=torch.bfloat16)
    opt = BlockOptimizer(model, lr=lr, inner_optimizer="sgd", switch_every=4, start_block=2)
    names = active_names(opt)
    for i in range(2):
        backward(model, i, scale=0.5)
    masters = {n: p.detach().float() for n, p in model.named_parameters() if n in names}
    grads = {n: opt.master_grads[n].clone() for n in names}
    assert torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm) == 0  # nothing on the bf16 weights
    norm = opt.clip_grad_norm_(max_norm)
    expected = torch.nn.utils.get_total_norm(list(grads.values()))
    assert torch.equal(norm, expected) and norm > max_norm
    coef = torch.clamp(max_norm / (expected + 1e-6), max=1.0)
    opt.step()
    params = dict(model.named_parameters())
    for n in names:
        want = masters[n] - lr * (grads[n] * coef)
        assert torch.equal(params[n], want.to(torch.bfloat16)), n


def _train(tmp_path, model, tag: str, max_grad_norm: float, fp32: bool):
    data = [{"input_ids": batch(i, bs=1)[0], "labels": batch(i, bs=1)[0]} for i in range(32)]
    args = TrainingArguments(
        output_dir=str(tmp_path / tag), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=max_grad_norm, report_to="none",
        use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
    )
    cfg = BAdamConfig.from_flat(dict(inner_optimizer="sgd", switch_every=2, switch_mode="ascending",
                                     fp32_grad_accumulation=fp32))
    trainer = BAdamTrainer(model=model, args=args, train_dataset=data, badam_config=cfg)
    trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms


def test_trainer_clips_and_logs_the_fp32_gradients(tmp_path, tiny_llama):
    """HF's clipping through BAdam's fp32 gradients: the logged norm and the clipped updates agree with the bf16
    path (to bf16 rounding), and differ from an unclipped run by far more."""
    fp32, norms32 = _train(tmp_path, tiny_llama(dtype=torch.bfloat16), "fp32", 1e-2, True)
    bf16, norms16 = _train(tmp_path, tiny_llama(dtype=torch.bfloat16), "bf16", 1e-2, False)
    free, _ = _train(tmp_path, tiny_llama(dtype=torch.bfloat16), "free", 0.0, True)
    assert len(norms32) == 4 and all(n > 1e-2 for n in norms32)  # seen, and clipped (norm above max)
    assert all(abs(a - b) <= 2e-2 * b for a, b in zip(norms32, norms16))
    init = {n: p.detach() for n, p in tiny_llama(dtype=torch.bfloat16).named_parameters()}
    moved = [n for n in init if not torch.equal(init[n], fp32[n])]
    assert moved
    for n in moved:
        d32 = (fp32[n].float() - init[n].float()).norm()
        d16 = (bf16[n].float() - init[n].float()).norm()
        dfree = (free[n].float() - init[n].float()).norm()
        assert abs(d32 - d16) <= 0.1 * d16 + 1e-3, n
        assert dfree > 3 * d32, n  # clipping really happened in the fp32 run


# --- split masters: fp32 masters kept as their 16 low bits between steps ------------------------------------


def test_split_and_join_are_exact_for_every_float():
    from badam_hf.core.masters import join_master, split_master

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g) * torch.logspace(-30, 30, 200_000)
    ties = (torch.randint(0, 2**15, (500,), generator=g, dtype=torch.int32) * 65536 + 0x8000).view(torch.float32)
    x = torch.cat([x, ties, -ties, torch.tensor([0.0, -0.0, 3.3e38, -3.3e38, 1e-42, float("inf")])])
    w, low = torch.empty_like(x, dtype=torch.bfloat16), torch.empty_like(x, dtype=torch.int16)
    split_master(x, w, low)
    assert torch.equal(join_master(w, low, torch.empty_like(x)).view(torch.int32), x.view(torch.int32))
    rne = x.to(torch.bfloat16)
    differ = w.view(torch.int16) != rne.view(torch.int16)
    is_tie = torch.bitwise_and(x.view(torch.int32), 0xFFFF) == 0x8000
    assert differ.any() and not (differ & ~is_tie).any()  # only exact ties round differently from torch's
    finite = torch.isfinite(x) & torch.isfinite(rne.float())
    assert ((w.float() - x).abs() <= (rne.float() - x).abs())[finite].all()  # and never farther from the master


def test_split_masters_hold_two_bytes_between_steps_and_rebuild_exactly(tiny_llama):
    model = tiny_llama(dtype=torch.bfloat16)
    opt = BlockOptimizer(model, lr=1e-2, switch_every=3, switch_mode="ascending")
    names = active_names(opt)
    numel = sum(p.numel() for n, p in model.named_parameters() if n in names)
    after_step = {}
    during = []
    opt.inner.register_step_post_hook(lambda o, a, k: (
        during.append(opt.memory_bytes()["masters"]),
        after_step.update({n: opt.masters[n].clone() for n in names})))
    for t in range(2):
        backward(model, t)
        opt.step()
        opt.zero_grad()
        assert opt.memory_bytes()["masters"] == 2 * numel  # low halves only, until the next step
        # The next step (and anything reading opt.masters) gets the masters back bit for bit.
        for n in names:
            assert torch.equal(opt.masters[n].view(torch.int32), after_step[n].view(torch.int32)), n
        assert opt.memory_bytes()["masters"] == 4 * numel  # joined by the read
    assert during == [4 * numel, 4 * numel]
    whole = BlockOptimizer(tiny_llama(dtype=torch.bfloat16), lr=1e-2, switch_every=3, split_masters=False)
    backward(whole.model, 0)
    whole.step()
    assert whole.memory_bytes()["masters"] == 4 * numel
