"""Stochastic rounding (switch_rounding, inactive_rounding): the rounding itself (unbiased, one of the two
neighbouring bf16 numbers, exact values kept, inf/NaN/signs), its noise as a pure function of (key, position)
so shards, ranks and resumed runs agree, where the optimizer applies it (only when a master is dropped, in
every mode, and at the end of training), and BREAD's inactive step."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from badam_hf import BAdamConfig, BAdamTrainer, BlockOptimizer
from badam_hf.core.errors import BAdamConfigError, DistributedSetupError
from badam_hf.core.masters import selected
from badam_hf.core.rounding import SWITCH_STREAM, noise16, rounding_key, stochastic_add_, stochastic_round

VOCAB = 64


def batch(seed: int, bs: int = 2, seq: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(9000 + seed)
    return torch.randint(0, VOCAB, (bs, seq), generator=g)


def down_up(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 numbers enclosing fp32 `x` (bit patterns as int32): truncated, and one step up in magnitude
    (equal to the truncated one when `x` is a bf16 number already)."""
    bits = x.reshape(-1).view(torch.int32)
    down = bits >> 16
    exact = (bits & 0xFFFF) == 0
    return down, torch.where(exact, down, down + 1)


def pattern(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(-1).view(torch.int16).to(torch.int32)


def is_neighbour(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    down, up = down_up(x)
    p = pattern(w)
    return ((p == (down & 0xFFFF).to(torch.int16).to(torch.int32))
            | (p == (up & 0xFFFF).to(torch.int16).to(torch.int32)))


# --- the rounding itself -----------------------------------------------------------------------------------


def values(n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    mags = torch.logspace(-40, 30, n, dtype=torch.float64).float()  # subnormals up to large numbers
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return mags * signs * (1 + torch.rand(n, generator=g))


def test_every_result_is_one_of_the_two_neighbours_and_exact_values_stay():
    x = torch.cat([values(), torch.randn(4096) * 0.02, torch.tensor([1.0, -2.5, 0.0, -0.0, 2 ** -130])])
    for key in range(5):
        r = stochastic_round(x, key)
        assert r.dtype == torch.bfloat16 and r.shape == x.shape
        assert bool(is_neighbour(r, x).all())
    exact = torch.randn(1000).to(torch.bfloat16).float()
    assert torch.equal(stochastic_round(exact, 3).float(), exact)
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0])
    special = torch.cat([special, torch.tensor([0x7F800001, 0xFF80FFFF], dtype=torch.int64).to(torch.int32).view(torch.float32)])
    for key in range(20):
        r = stochastic_round(special, key)
        assert r[0] == float("inf") and r[1] == -float("inf") and torch.isnan(r[2]) and torch.isnan(r[5:]).all()
        assert pattern(r[3:5]).tolist() == [0, -0x8000]  # +0 and -0 keep their sign


def test_stochastic_rounding_is_unbiased():
    """Each value repeated N times (distinct positions draw independent noise): the mean of the rounded values
    lies within 5 standard errors of the fp32 value, and the rounding up happens with the expected frequency."""
    x = torch.cat([values(), torch.randn(64) * 0.02, torch.tensor([0.02 + 1e-6, -0.02 - 1e-6, 1 + 2 ** -12])])
    N = 4096
    rep = x.repeat_interleave(N)
    r = stochastic_round(rep, rounding_key(0, 1, 2, SWITCH_STREAM)).double().view(-1, N)
    down, up = down_up(x)
    lo = (down & 0xFFFF).to(torch.int16).view(torch.bfloat16).double()
    hi = (up & 0xFFFF).to(torch.int16).view(torch.bfloat16).double()
    p = ((x.double() - lo) / (hi - lo)).nan_to_num(0.0)  # chance of rounding up (0 for exact values)
    se = (hi - lo).abs() * torch.sqrt(p * (1 - p) / N)
    err = (r.mean(1) - x.double()).abs()
    assert bool((err <= 5 * se + 1e-300).all()), (err / se.clamp_min(1e-300)).max()
    # 0.02 + 1e-6: nearest rounding is 1.8e-5 off; the mean of 2**20 stochastic roundings (standard error
    # 6e-8) keeps the 1e-6.
    v = torch.full((2 ** 20,), 0.02 + 1e-6)
    assert abs(v[:1].to(torch.bfloat16).double().item() - v[0].item()) > 1e-5
    assert abs(stochastic_round(v, 5).double().mean().item() - v[0].item()) < 4e-7


def test_noise_is_a_pure_function_of_key_and_position():
    x = torch.randn(10_000) * 0.02
    key = rounding_key(7, 3, 5, SWITCH_STREAM)
    whole = stochastic_round(x, key)
    assert torch.equal(stochastic_round(x, key), whole)
    assert not torch.equal(stochastic_round(x, rounding_key(7, 4, 5, SWITCH_STREAM)), whole)  # another step
    assert not torch.equal(stochastic_round(x, rounding_key(7, 3, 6, SWITCH_STREAM)), whole)  # another parameter
    assert not torch.equal(stochastic_round(x, rounding_key(8, 3, 5, SWITCH_STREAM)), whole)  # another seed
    # A shard (any offset, e.g. FSDP2's row-wise pieces over 1, 2 or 3 ranks) draws its slice of the whole.
    for ranks in (2, 3):
        bounds = [i * x.numel() // ranks for i in range(ranks + 1)]
        parts = [stochastic_round(x[a:b], key, a) for a, b in zip(bounds[:-1], bounds[1:])]
        assert torch.equal(torch.cat(parts), whole)
    # Scattered positions draw what those entries draw in the whole tensor.
    idx = torch.tensor([5, 17, 9999, 0, 4242])
    assert torch.equal(stochastic_round(x[idx], key, idx), whole[idx])
    # Chunking changes nothing either (positions beyond 2**32 mix their high half in).
    import badam_hf.core.rounding as rounding

    old = rounding.CHUNK
    try:
        rounding.CHUNK = 333
        assert torch.equal(stochastic_round(x, key), whole)
    finally:
        rounding.CHUNK = old
    far = torch.arange(2 ** 32 - 4, 2 ** 32 + 4, dtype=torch.int64)
    assert len(set(noise16(key, far).tolist())) > 4
    assert noise16(key, far).min() >= 0 and noise16(key, far).max() < 65536


def test_stochastic_add_is_the_fp32_step_rounded_to_a_neighbour():
    w = (torch.randn(5000) * 0.02).to(torch.bfloat16)
    u = torch.randn(5000).to(torch.bfloat16)
    exact = w.float().add(u.float(), alpha=-1e-6)
    out = w.clone()
    stochastic_add_(out, u, -1e-6, key=11)
    assert bool(is_neighbour(out, exact).all())
    # A step mostly far below half an ulp: the bf16 step moves only the tiniest weights, the stochastic one many.
    near = w.add(u, alpha=-1e-6)
    assert int((out != w).sum()) > 2 * int((near != w).sum()) > 0
    assert int(((out != w) & (near == w)).sum()) > 50


# --- in the optimizer: only where a master is dropped ---------------------------------------------------------


MODES = {
    "layer": dict(switch_every=3, switch_mode="ascending"),
    "lisa": dict(mode="lisa", lisa_layers=2, switch_every=3),
    "ratio_adjacent": dict(mode="ratio", update_ratio=0.3, mask_mode="adjacent", switch_every=3),
    "ratio_scatter": dict(mode="ratio", update_ratio=0.3, mask_mode="scatter", switch_every=3),
}


def run_to_first_end(tiny_llama, rounding: str, mode: str, split: bool = True):
    """Three steps (one visit/period) at a small lr; the masters as the last inner step left them."""
    model = tiny_llama(dtype=torch.bfloat16, seed=0)
    opt = BlockOptimizer(model, lr=1e-4, switch_rounding=rounding, split_masters=split, **MODES[mode])
    masters: dict[str, tuple] = {}
    opt.inner.register_step_post_hook(lambda o, a, k: masters.update(
        {n: (opt._block_masters.value(n).clone(), opt.selections.get(n)) for n in opt.trainable_names}))
    weights = []
    for step in range(3):
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return opt, weights, masters


@pytest.mark.parametrize("mode", list(MODES))
def test_stochastic_applies_only_where_the_masters_are_dropped(tiny_llama, mode):
    """Inside a visit both roundings give the same weights bit for bit; at its last step nearest writes torch's
    rounding of the masters, stochastic one of the two neighbours of each master, and not always the nearest.
    What lives on (always-active parameters in lisa) is written as between steps, identically."""
    near_opt, near, masters = run_to_first_end(tiny_llama, "nearest", mode)
    sto_opt, sto, sto_masters = run_to_first_end(tiny_llama, "stochastic", mode)
    for step in range(2):
        for n in near[step]:
            assert torch.equal(near[step][n], sto[step][n]), (step, n)
    always = set(near_opt.partition.always_active)
    differ = 0
    for n, (m, sel) in masters.items():
        assert torch.equal(m, sto_masters[n][0]), n  # the same trajectory up to the last write
        w_near, w_sto = selected(near[2][n], sel), selected(sto[2][n], sel)
        if n in always:
            assert torch.equal(w_near, w_sto), n
            continue
        assert torch.equal(w_near.reshape(-1), m.reshape(-1).to(torch.bfloat16)), n
        assert bool(is_neighbour(w_sto, m).all()), n
        differ += int((w_near != w_sto).sum())
    assert differ > 0
    # Entries outside a ratio selection are untouched by both.
    for n, p in near[2].items():
        assert p.shape == sto[2][n].shape


def test_auto_is_the_default_and_rounds_stochastically(tiny_llama):
    """The default is switch_rounding=auto, which is stochastic where the optimizer writes the masters itself
    (bit for bit), and differs from nearest; BREAD's inactive_rounding stays nearest by default. Naming nearest
    gives the authors' rounding (the parity tests pin that trajectory against their package)."""
    assert BAdamConfig().switch_rounding == "auto" and BAdamConfig().inactive.inactive_rounding == "nearest"
    assert BAdamConfig().stochastic_switch and not BAdamConfig(switch_rounding="nearest").stochastic_switch

    def run(**kw):
        model = tiny_llama(dtype=torch.bfloat16, seed=0)
        opt = BlockOptimizer(model, lr=1e-3, switch_every=2, switch_mode="random", seed=3,
                             inactive_update="sgd", **kw)
        opt.total_steps = 5
        for step in range(5):
            ids = batch(step)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        opt.finish()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    default = run()
    named = run(switch_rounding="stochastic", inactive_rounding="nearest")
    assert all(torch.equal(default[n], named[n]) for n in default)
    nearest = run(switch_rounding="nearest")
    assert not all(torch.equal(default[n], nearest[n]) for n in default)


def test_the_last_step_of_training_rounds_every_live_master(tiny_llama):
    """total_steps (the Trainer's max_steps) makes its step the end of every visit: the block's masters, and
    lisa's always-active ones, are written stochastically there. Without it, finish() does the same once."""
    def run(total, finish, steps=2):
        model = tiny_llama(dtype=torch.bfloat16, seed=0)
        opt = BlockOptimizer(model, lr=1e-4, mode="lisa", lisa_layers=1, switch_every=5,
                             switch_rounding="stochastic")
        opt.total_steps = total
        masters = {}
        opt.inner.register_step_post_hook(lambda o, a, k: masters.update(
            {n: opt._block_masters.value(n).clone() for n in opt.trainable_names}))
        for step in range(steps):
            ids = batch(step)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        if finish:
            opt.finish()
            opt.finish()  # once only
        return opt, {n: p.detach().clone() for n, p in model.named_parameters()}, masters

    opt, at_total, masters = run(total=2, finish=False)
    assert "model.embed_tokens.weight" in opt.partition.always_active
    for n, m in masters.items():
        assert bool(is_neighbour(at_total[n], m).all()), n
    assert any(not torch.equal(at_total[n], m.to(torch.bfloat16)) for n, m in masters.items())
    _, finished, _ = run(total=None, finish=True)  # e.g. an early stop: the same noise (same step count)
    assert all(torch.equal(finished[n], at_total[n]) for n in at_total)
    _, no_end, _ = run(total=None, finish=False)
    assert any(not torch.equal(no_end[n], at_total[n]) for n in at_total)
    # Training may go on after finish(): the masters stay exact.
    opt, _, _ = run(total=None, finish=True)
    ids = batch(9)
    opt.model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


# --- resume and the Trainer ---------------------------------------------------------------------------------


def data(n: int = 24, seq: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, seq), generator=g)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def make_trainer(tiny_llama, out, optim_args, model_seed=0, max_steps=8):
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
        lr_scheduler_type="constant", weight_decay=0.0, save_strategy="steps", save_steps=4,
        report_to="none", use_cpu=True, logging_steps=1, disable_tqdm=True, seed=0, optim_args=optim_args,
    )
    model = tiny_llama(dtype=torch.bfloat16, seed=model_seed, attention_dropout=0.0)
    return BAdamTrainer(model=model, args=args, train_dataset=data())


RESUME_MODES = {
    "layer": "switch_every=3,seed=7,switch_rounding=stochastic",
    "lisa": "mode=lisa,lisa_layers=2,switch_every=3,seed=7,switch_rounding=stochastic",
    "ratio_scatter": "mode=ratio,update_ratio=0.1,mask_mode=scatter,switch_every=3,seed=7,switch_rounding=stochastic",
    "bread": "switch_every=3,seed=7,switch_rounding=stochastic,inactive_update=sgd,inactive_rounding=stochastic",
}


@pytest.mark.parametrize("mode", list(RESUME_MODES))
def test_resumed_run_equals_uninterrupted_bit_for_bit(mode, tmp_path, tiny_llama):
    """Checkpoint at step 4 (one step into the second visit); the resumed run draws the same noise at every
    later block end, BREAD step and the final step, and ends bit-identical. The stochastic run differs from
    the nearest one (the keys were applied)."""
    args = RESUME_MODES[mode]
    full = make_trainer(tiny_llama, tmp_path / "full", args)
    full.train()
    resumed = make_trainer(tiny_llama, tmp_path / "resumed", args, model_seed=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    full_params = dict(full.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, full_params[n]), n
    near = make_trainer(tiny_llama, tmp_path / "near", args.replace("stochastic", "nearest"))
    near.train()
    assert any(not torch.equal(p, full_params[n]) for n, p in near.model.named_parameters())


def test_the_trainer_rounds_at_its_last_step(tmp_path, tiny_llama):
    """The callback gives the optimizer max_steps: the last checkpoint and the trained model hold the same
    stochastically rounded weights."""
    from safetensors.torch import load_file

    trainer = make_trainer(tiny_llama, tmp_path / "run", "switch_every=3,seed=7,switch_rounding=stochastic")
    trainer.train()
    from badam_hf.core.optimizer import unwrap_optimizer

    opt = unwrap_optimizer(trainer.optimizer)
    assert opt.total_steps == 8 and opt._finished_at == 8
    saved = load_file(str(tmp_path / "run" / "checkpoint-8" / "model.safetensors"))
    for n, p in trainer.model.named_parameters():
        if n in saved:
            assert torch.equal(saved[n], p.detach()), n


# --- BREAD ------------------------------------------------------------------------------------------------


def test_bread_stochastic_moves_weights_that_nearest_leaves(tiny_llama):
    """The same gradient, a step far below half an ulp: bf16 arithmetic leaves (nearly) every inactive weight
    as it was; the stochastic step moves many, each to a neighbour of the fp32 result, keeping its mean."""
    def step(rounding):
        model = tiny_llama(dtype=torch.bfloat16, seed=0)
        opt = BlockOptimizer(model, lr=1e-6, switch_every=5, switch_mode="ascending", start_block=0,
                             inactive_update="sgd", inactive_lr_scale=5.0, inactive_rounding=rounding)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {}
        for n in opt.inactive_names:  # the gradient the hook consumes (before it frees it)
            model.get_parameter(n).register_hook(lambda g, n=n: grads.__setitem__(n, g.clone()))
        ids = batch(0)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        return opt, model, before, grads

    opt, near, before, grads = step("nearest")
    _, sto, _, grads_sto = step("stochastic")
    moved_near = moved_sto = only_sto = 0
    for n in opt.inactive_names:
        assert torch.equal(grads[n], grads_sto[n]), n
        exact = before[n].float() - 5e-6 * grads[n].float()
        w_near, w_sto = near.get_parameter(n).detach(), sto.get_parameter(n).detach()
        assert bool(is_neighbour(w_sto, exact).all()), n
        moved_near += int((w_near != before[n]).sum())
        moved_sto += int((w_sto != before[n]).sum())
        only_sto += int(((w_sto != before[n]) & (w_near == before[n])).sum())
    assert moved_sto > 2 * moved_near and only_sto > 10


# --- settings -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    ("switch_rounding=up", r"switch_rounding='up' is not valid; choose one of 'auto', 'nearest', 'stochastic'"),
    ("inactive_update=sgd,inactive_rounding=floor",
     r"inactive_rounding='floor' is not valid; choose one of 'nearest', 'stochastic'"),
    ("inactive_rounding=stochastic", r"inactive_rounding configure inactive_update, which is 'none'"),
])
def test_bad_values_are_refused_with_the_choices(args, message):
    with pytest.raises(BAdamConfigError, match=message):
        BAdamConfig.from_optim_args(args)


def test_zero3_refuses_stochastic_switch_rounding(tiny_llama):
    from badam_hf.engines.common import check_mode_supported

    check_mode_supported(BlockOptimizer(tiny_llama()), "DeepSpeed ZeRO-3")  # auto: nearest there, accepted
    opt = BlockOptimizer(tiny_llama(), switch_rounding="stochastic")
    check_mode_supported(opt, "FSDP2")
    with pytest.raises(DistributedSetupError, match=r"switch_rounding='stochastic' is not supported under DeepSpeed"):
        check_mode_supported(opt, "DeepSpeed ZeRO-3")
