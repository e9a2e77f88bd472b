"""The block family in one optimizer: mode ratio (a fraction of every matrix), mode lisa (sampled layers plus
the embeddings and head) and BREAD-style inactive updates (inactive_update=sgd|signsgd).

Single process, tiny local models. DDP and FSDP2 runs of ratio and lisa are in test_distributed.py and
test_fsdp.py; resume of every mode in test_resume.py.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from badam_hf import BAdamConfig, BlockOptimizer
from badam_hf.core.errors import BAdamConfigError, DistributedSetupError
from badam_hf.core.selection import localize, select_entries, selection_size
import tiny_models
from tiny_models import snapshot



batch = functools.partial(tiny_models.batch, offset=7000)
backward = functools.partial(tiny_models.backward, offset=7000)


def fresh_copy(model):
    """The same weights in a new model without the optimizer's hooks (a deepcopy would copy them)."""
    ref = type(model)(model.config).to(next(model.parameters()).dtype)
    ref.load_state_dict(model.state_dict())
    return ref


def mask_of(sel, numel: int) -> torch.Tensor:
    m = torch.zeros(numel, dtype=torch.bool)
    m[sel] = True
    return m


def n_selected(sel) -> int:
    return sel.stop - sel.start if isinstance(sel, slice) else sel.numel()


# --- mode ratio ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_mode", ["adjacent", "scatter"])
def test_ratio_changes_exactly_the_selected_entries(tiny_llama, mask_mode):
    """Within a period only the selected entries of each parameter move; every other entry, and every
    parameter outside the partition, stays bit-identical. After the switch the masks move."""
    model = tiny_llama(dtype=torch.bfloat16)
    opt = BlockOptimizer(model, lr=1e-2, mode="ratio", update_ratio=0.1, mask_mode=mask_mode, switch_every=3,
                         weight_decay=0.1)
    sels = {n: s.clone() if torch.is_tensor(s) else s for n, s in opt.selections.items()}
    params = dict(model.named_parameters())
    in_partition = {n for b in opt.partition.blocks for n in b.param_names}
    assert set(sels) == in_partition  # every parameter of the partition trains a part of itself
    for n, s in sels.items():
        assert n_selected(s) == selection_size(params[n].numel(), 0.1)
    before = snapshot(model)
    for i in range(3):
        backward(model, i)
        opt.step()
        opt.zero_grad()
    moved = total = 0
    for n, p in params.items():
        changed = (p.detach() != before[n]).view(-1)
        if n not in sels:
            assert not changed.any(), n  # embeddings / final norm / head: not in the partition
            continue
        inside = mask_of(sels[n], p.numel())
        assert not (changed & ~inside).any(), n
        moved, total = moved + int(changed.sum()), total + int(inside.sum())
    assert moved > 0.95 * total  # Adam moves (almost) every selected bf16 entry
    # The period ended at step 3: new masks.
    assert any(not torch.equal(mask_of(sels[n], params[n].numel()), mask_of(s, params[n].numel()))
               for n, s in opt.selections.items())


def test_ratio_masks_differ_between_same_shape_parameters(tiny_llama):
    """Upstream caches one mask per tensor shape, so all q_proj matrices share indices. Here each parameter
    draws its own: a pure function of (seed, period, parameter index)."""
    model = tiny_llama(layers=6)
    for mask_mode in ("adjacent", "scatter"):
        opt = BlockOptimizer(model, mode="ratio", update_ratio=0.05, mask_mode=mask_mode)
        q = [s for n, s in opt.selections.items() if n.endswith("q_proj.weight")]
        numel = model.model.layers[0].self_attn.q_proj.weight.numel()
        masks = {tuple(mask_of(s, numel).nonzero().view(-1).tolist()) for s in q}
        assert len(masks) >= 4, mask_mode  # 6 draws; adjacent has 20 runs to choose from
        again = BlockOptimizer(model, mode="ratio", update_ratio=0.05, mask_mode=mask_mode)
        for n, s in opt.selections.items():
            assert torch.equal(mask_of(s, numel * 4), mask_of(again.selections[n], numel * 4))
    # scatter: k distinct entries spread over the whole tensor; adjacent: k consecutive ones.
    idx = select_entries(1000, 0.1, "scatter", 0, 0, 0)
    assert idx.numel() == 100 and idx.unique().numel() == 100 and idx.min() < 10 and idx.max() >= 990
    sl = select_entries(1000, 0.1, "adjacent", 0, 0, 0)
    assert sl.stop - sl.start == 100
    # adjacent sweeps: over 1/ratio periods the runs cover the whole tensor.
    cover = torch.zeros(1000, dtype=torch.bool)
    for period in range(10):
        cover[select_entries(1000, 0.1, "adjacent", 0, period, 0)] = True
    assert cover.all()


def test_ratio_localize_cuts_a_selection_to_a_shard():
    whole = select_entries(1000, 0.2, "scatter", 1, 2, 3)
    parts = [localize(whole, s, 250, 1000) for s in (0, 250, 500, 750)]
    glued = torch.cat([p.long() + s for p, s in zip(parts, (0, 250, 500, 750))])
    assert torch.equal(glued, whole.long())
    assert localize(slice(100, 300), 250, 250, 1000) == slice(0, 50)
    assert localize(slice(100, 200), 250, 250, 1000) == slice(0, 0)


def test_ratio_update_equals_adamw_on_the_selected_entries(tiny_llama):
    """fp32 weights: the trained entries follow torch's AdamW (with the user's weight decay on the decay group)
    run on the selected entries alone, with the gradients of those entries."""
    model = tiny_llama()
    ref = copy.deepcopy(model)
    opt = BlockOptimizer(model, lr=1e-2, mode="ratio", update_ratio=0.2, mask_mode="scatter", switch_every=4,
                         weight_decay=0.1)
    sels = dict(opt.selections)
    rparams = dict(ref.named_parameters())
    leaves = {n: rparams[n].detach().view(-1)[s].clone().requires_grad_(True) for n, s in sels.items()}
    decay = opt._decay_names
    ref_opt = torch.optim.AdamW(
        [{"params": [leaves[n] for n in sels if n in decay], "weight_decay": 0.1},
         {"params": [leaves[n] for n in sels if n not in decay], "weight_decay": 0.0}], lr=1e-2, fused=True)
    for i in range(3):
        backward(model, i)
        opt.step()
        opt.zero_grad()
        ref.zero_grad()
        backward(ref, i)
        for n, s in sels.items():
            leaves[n].grad = rparams[n].grad.view(-1)[s].clone()
        ref_opt.step()
        with torch.no_grad():
            for n, s in sels.items():
                rparams[n].view(-1)[s] = leaves[n]
    for n, p in model.named_parameters():
        assert torch.equal(p, rparams[n]), n


@pytest.mark.parametrize("mask_mode", ["adjacent", "scatter"])
def test_ratio_state_bytes_match_the_formula(tiny_llama, mask_mode):
    """Optimizer-side bytes for bf16 weights, per selected entry: fp32 gradient 4 (during backward), master 4,
    moments 8 (+ one step counter per tensor): 16 x update_ratio x trained parameters at the step. Between steps
    an adjacent master is held split (2 bytes); a scattered one stays whole and its indices cost 4."""
    model = tiny_llama(layers=2, dtype=torch.bfloat16, hidden=64, intermediate=128)
    opt = BlockOptimizer(model, lr=1e-3, mode="ratio", update_ratio=0.05, mask_mode=mask_mode, switch_every=10)
    k = sum(n_selected(s) for s in opt.selections.values())
    trained = sum(p.numel() for b in opt.partition.blocks for n, p in model.named_parameters() if n in b.param_names)
    assert abs(k - 0.05 * trained) <= len(opt.selections)  # floor per tensor
    counted = {}
    opt.inner.register_step_post_hook(lambda *a: counted.update(opt.memory_bytes()))
    backward(model, 0)
    assert opt.memory_bytes()["grads"] == 4 * k
    opt.step()  # the post-hook runs with master, moments (and the grads just used) all alive
    steps_bytes = 4 * len(opt.selections)  # fused AdamW's per-tensor fp32 step counters
    assert counted["masters"] == 4 * k and counted["optimizer_state"] == 8 * k + steps_bytes
    assert counted["masters"] + counted["optimizer_state"] + 4 * k == 16 * k + steps_bytes
    after = opt.memory_bytes()
    assert after["grads"] == 0 and after["optimizer_state"] == 8 * k + steps_bytes
    if mask_mode == "adjacent":
        assert after["masters"] == 2 * k and after["selections"] == 0
    else:
        assert after["masters"] == 4 * k and after["selections"] == 4 * k
    # Versus a full-model AdamW on the same parameters: 16 bytes each.
    assert (16 * k) / (16 * trained) == pytest.approx(0.05, rel=0.1)


def test_ratio_masks_move_only_at_optimizer_steps_under_accumulation(tiny_llama):
    """switch_every=1 with 3 micro-batches per step: the masks hold through the window (the three gradients
    accumulate on the same entries, in fp32) and move at the step."""
    model = tiny_llama(dtype=torch.bfloat16)
    ref = copy.deepcopy(model)
    opt = BlockOptimizer(model, lr=1e-3, mode="ratio", update_ratio=0.1, mask_mode="scatter", switch_every=1)
    first = {n: s.clone() for n, s in opt.selections.items()}
    for micro in range(3):
        backward(model, micro, scale=1 / 3)
        assert all(torch.equal(first[n], s) for n, s in opt.selections.items())
    # The accumulated fp32 gradient of the selected entries is the fp32 sum of the three micro-batches'.
    rparams = dict(ref.named_parameters())
    for p in rparams.values():
        p.requires_grad_(True)
    expect = {n: torch.zeros(s.numel()) for n, s in first.items()}
    for micro in range(3):
        ref.zero_grad()
        backward(ref, micro, scale=1 / 3)
        for n, s in first.items():
            expect[n] += rparams[n].grad.view(-1)[s].float()
    got = opt.master_grads
    for n in first:
        assert torch.equal(got[n], expect[n]), n
    opt.step()
    assert any(not torch.equal(first[n], s) for n, s in opt.selections.items())


def test_ratio_with_tied_embeddings_and_clipping(tiny_qwen2):
    """Tied input/output embeddings (upstream fails on Qwen/Gemma3) in the partition: the shared matrix is one
    parameter with one mask; clipping sees the selected fp32 gradients (the norm of exactly those entries)."""
    model = tiny_qwen2(tie_word_embeddings=True, dtype=torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    opt = BlockOptimizer(model, lr=1e-2, mode="ratio", update_ratio=0.1, include_embedding=True, switch_every=5)
    name = "model.embed_tokens.weight"
    assert name in opt.selections
    ref = fresh_copy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
    backward(ref, 0)
    expected = torch.sqrt(sum(
        (p.grad.view(-1)[opt.selections[n]].float() ** 2).sum()
        for n, p in ref.named_parameters() if n in opt.selections))
    sel = opt.selections[name]
    before = snapshot(model)
    backward(model, 0)
    norm = opt.clip_grad_norm_(1e-3)
    torch.testing.assert_close(norm, expected, rtol=1e-5, atol=0)
    opt.step()
    w = model.model.embed_tokens.weight.detach()
    changed = (w != before[name]).view(-1)
    assert changed.any() and not (changed & ~mask_of(sel, w.numel())).any()


def test_ratio_under_hf_trainer_with_accumulation_and_clipping(tiny_llama, tmp_path):
    """`--optim badam --optim_args mode=ratio,...` through the Trainer with GA=2 and max_grad_norm: only entries
    of the masks of the periods it ran through change; the weights outside the partition stay bit-identical."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    import badam_hf  # noqa: F401  (registers --optim badam)

    model = tiny_llama(dtype=torch.bfloat16)
    before = snapshot(model)
    ids = [batch(i, bs=1)[0].tolist() for i in range(16)]
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
        learning_rate=1e-2, max_grad_norm=0.5, optim="badam",
        optim_args="mode=ratio,update_ratio=0.1,mask_mode=adjacent,switch_every=2", report_to=[], use_cpu=True,
        logging_steps=1, save_strategy="no", bf16=False)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    opt = badam_hf.core.optimizer.unwrap_optimizer(trainer.optimizer)
    assert opt.mode == "ratio" and opt.global_step == 4
    periods = [h["badam/mask_period"] for h in trainer.state.log_history if "badam/mask_period" in h]
    assert periods[:4] == [0, 0, 1, 1]
    params = dict(model.named_parameters())
    allowed = {}
    for period in (0, 1):
        for n in opt.selections:
            start = select_entries(params[n].numel(), 0.1, "adjacent", opt.config.schedule.seed, period,
                                   opt._index[n])
            allowed.setdefault(n, torch.zeros(params[n].numel(), dtype=torch.bool))[start] = True
    for n, p in params.items():
        changed = (p.detach() != before[n]).view(-1)
        if n not in allowed:
            assert not changed.any(), n
        else:
            assert not (changed & ~allowed[n]).any(), n
    assert all(math.isfinite(h["grad_norm"]) for h in trainer.state.log_history if "grad_norm" in h)


# --- mode lisa ----------------------------------------------------------------------------------------------


def layer_of(name: str):
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else None


def test_lisa_trains_sampled_layers_and_everything_outside_the_stack(tiny_llama):
    """Each period trains lisa_layers sampled layers plus embeddings, final norm and head; the other layers
    stay bit-identical. Layers sampled in a later period do train (LMFlow #726: they never did)."""
    model = tiny_llama(layers=6)
    opt = BlockOptimizer(model, lr=1e-2, mode="lisa", lisa_layers=2, switch_every=2)
    assert opt.schedule.switch_every == 2
    assert set(opt.partition.always_active) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert opt.truncation.cut_layer is None  # the embeddings train: the backward runs to the bottom
    for period in range(3):
        sample = opt.active_blocks
        assert sample == opt.schedule.sample(period) and len(set(sample)) == 2
        before = snapshot(model)
        for i in range(2):
            backward(model, 10 * period + i)
            opt.step()
            opt.zero_grad()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        expected = {n for n, _ in model.named_parameters() if layer_of(n) in sample or layer_of(n) is None}
        assert changed == expected, period


def test_lisa_samples_move_only_at_optimizer_steps_under_accumulation(tiny_llama):
    """switch_every=1 with 3 micro-batches per step: the sampled layers (and what requires grad) hold through
    the window and every micro-batch's gradient reaches them; the next sample comes with the step."""
    model = tiny_llama(layers=6)
    opt = BlockOptimizer(model, lr=1e-2, mode="lisa", lisa_layers=2, switch_every=1, always_active=[])
    params = dict(model.named_parameters())
    for step in range(3):
        sample = opt.active_blocks
        assert sample == opt.schedule.sample(step)
        trainable = {n for n, p in params.items() if p.requires_grad}
        assert trainable == {n for n in params if layer_of(n) in sample}
        grads = []
        for micro in range(3):
            backward(model, 10 * step + micro, scale=1 / 3)
            assert opt.active_blocks == sample
            assert {n for n, p in params.items() if p.requires_grad} == trainable
            grads.append({n: params[n].grad.clone() for n in trainable})
        # each micro-batch added to the same layers' gradients (fp32 weights: they sum on .grad)
        assert all(not torch.equal(grads[0][n], grads[2][n]) for n in trainable)
        opt.step()
        opt.zero_grad()


def test_lisa_frees_state_of_layers_that_leave_and_restarts_resampled_ones(tiny_llama):
    model = tiny_llama(layers=4, dtype=torch.bfloat16)
    opt = BlockOptimizer(model, lr=1e-3, mode="lisa", lisa_layers=2, switch_every=1)
    params = dict(model.named_parameters())
    for step in range(6):
        backward(model, step)
        opt.step()
        opt.zero_grad()
        # After the switch: no state for anything but the always-active parameters (the new sample starts
        # fresh, also a layer drawn again); theirs has counted every step.
        held = {n for n, p in params.items() if opt.inner.state.get(opt._inner_tensor(n))}
        assert held == set(opt.partition.always_active), step
        assert set(opt.masters) <= set(opt.partition.always_active)
        emb = opt.inner.state[opt._inner_tensor("model.embed_tokens.weight")]
        assert int(emb["step"]) == step + 1
    sampled = [opt.schedule.sample(p) for p in range(6)]
    assert any(set(a) & set(b) for a, b in zip(sampled, sampled[1:]))  # a layer drawn twice in a row restarted


def test_lisa_sampling_is_private_pure_and_without_replacement(tiny_llama):
    model = tiny_llama(layers=8)
    rng = torch.get_rng_state()
    a = BlockOptimizer(model, mode="lisa", lisa_layers=3, seed=5)
    draws = [a.schedule.sample(p) for p in range(50)]
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is untouched (axolotl reseeds it)
    assert all(len(set(d)) == 3 and list(d) == sorted(d) for d in draws)
    assert len(set(draws)) > 20  # the samples vary
    counts = torch.bincount(torch.tensor([b for d in draws for b in d]), minlength=8)
    assert counts.min() > 5  # every layer gets drawn
    b = BlockOptimizer(model, mode="lisa", lisa_layers=3, seed=5)
    assert [b.schedule.sample(p) for p in range(50)] == draws  # a pure function of (seed, period)
    c = BlockOptimizer(model, mode="lisa", lisa_layers=3, seed=6)
    assert [c.schedule.sample(p) for p in range(50)] != draws


def test_lisa_truncates_the_backward_when_the_embeddings_do_not_train(tiny_llama):
    model = tiny_llama(layers=6)
    opt = BlockOptimizer(model, lr=1e-2, mode="lisa", lisa_layers=2, switch_every=1, always_active=[])
    for step in range(4):
        assert opt.truncation.cut_layer == min(opt.active_blocks)
        backward(model, step)
        grads = {layer_of(n) for n, p in model.named_parameters() if p.grad is not None or n in opt.master_grads}
        assert grads == set(opt.active_blocks)
        opt.step()
        opt.zero_grad()


def test_lisa_rejects_more_layers_than_the_model_has(tiny_llama):
    with pytest.raises(BAdamConfigError, match=r"lisa_layers=5 is out of range.*4 layers.*1\.\.4"):
        BlockOptimizer(tiny_llama(layers=4), mode="lisa", lisa_layers=5)


# --- BREAD: inactive updates --------------------------------------------------------------------------------


def reference_grads(model, seeds, scale=1.0) -> dict[str, torch.Tensor]:
    ref = fresh_copy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
        p.grad = None
    for s in seeds:
        backward(ref, s, scale)
    return {n: p.grad.clone() for n, p in ref.named_parameters()}


@pytest.mark.parametrize("rule", ["sgd", "signsgd"])
def test_inactive_update_above_matches_the_rule_and_keeps_truncation(tiny_llama, rule):
    """Active block 1 of 4 (AdamW); layers 2-3, final norm and head take p -= lr x scale x g (or sign g) at the
    step; layer 0 and the embeddings stay bit-identical, and their backward is not run."""
    model = tiny_llama()
    opt = BlockOptimizer(model, lr=1e-2, switch_every=5, switch_mode="ascending", start_block=1,
                         inactive_update=rule, inactive_lr_scale=3.0)
    assert opt.truncation.cut_layer == 1
    inactive = set(opt.inactive_names)
    assert inactive == {n for n, _ in model.named_parameters()
                        if (layer_of(n) or -1) >= 2 or n in ("model.norm.weight", "lm_head.weight")}
    before = snapshot(model)
    g = reference_grads(model, [0])
    backward(model, 0)
    for n in inactive:  # the backward leaves the gradients and changes no weight (a NaN may still come)
        assert torch.equal(model.get_parameter(n), before[n]) and model.get_parameter(n).grad is not None, n
    opt.step()
    assert all(p.grad is None for n, p in model.named_parameters() if n in inactive)  # freed as consumed
    for n in inactive:
        step = g[n].sign() if rule == "signsgd" else g[n]
        torch.testing.assert_close(model.get_parameter(n).detach(), before[n] - 3e-2 * step, rtol=1e-6, atol=1e-7)
    for n, p in model.named_parameters():
        if layer_of(n) == 0 or n == "model.embed_tokens.weight":
            assert torch.equal(p, before[n]), n
        elif layer_of(n) == 1:
            assert not torch.equal(p, before[n]), n
    assert opt.inner.state and all(opt._inner_tensor(n) not in opt.inner.state for n in inactive)  # no state


def test_inactive_scope_all_updates_everything_with_a_full_backward(tiny_llama):
    model = tiny_llama()
    opt = BlockOptimizer(model, lr=1e-2, switch_mode="ascending", start_block=2, inactive_update="sgd",
                         inactive_scope="all")
    assert opt.truncation.cut_layer is None
    before = snapshot(model)
    backward(model, 0)
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_inactive_update_is_bf16_in_place_and_follows_the_scheduled_lr(tiny_llama):
    model = tiny_llama(dtype=torch.bfloat16)
    opt = BlockOptimizer(model, lr=1e-2, switch_every=10, switch_mode="ascending", start_block=0,
                         inactive_update="sgd", inactive_lr_scale=5.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for step in range(2):
        before = snapshot(model)
        g = reference_grads(model, [step])
        backward(model, step)
        opt.step()
        lr = 1e-2 * 0.5 ** step * 5.0
        n = "model.layers.3.mlp.down_proj.weight"
        expect = (before[n].float() - lr * g[n].float()).to(torch.bfloat16)
        assert model.get_parameter(n).dtype == torch.bfloat16
        assert (model.get_parameter(n).detach().float() - expect.float()).abs().max() <= 2 ** -7 * expect.abs().max()
        opt.zero_grad()
        sched.step()


def test_inactive_update_under_accumulation_steps_once_on_the_sum(tiny_llama):
    """The inactive gradients accumulate through the window and take one step on their sum at step(); no
    boundary check is needed (one registered by code written for earlier releases changes nothing)."""
    model = tiny_llama()
    opt = BlockOptimizer(model, lr=1e-2, switch_mode="ascending", start_block=0, inactive_update="sgd",
                         inactive_lr_scale=2.0)
    opt.register_boundary_check(lambda: True)
    n = "model.layers.2.self_attn.o_proj.weight"
    before = snapshot(model)
    g = reference_grads(model, [0, 1, 2], scale=1 / 3)
    for i in range(3):
        backward(model, i, scale=1 / 3)
        assert torch.equal(model.get_parameter(n), before[n]) and model.get_parameter(n).grad is not None
    opt.step()
    assert model.get_parameter(n).grad is None
    torch.testing.assert_close(model.get_parameter(n).detach(), before[n] - 2e-2 * g[n], rtol=1e-6, atol=1e-7)


def test_gradient_clipping_sees_and_scales_the_inactive_gradients(tiny_llama):
    """The inactive gradients are part of the step's gradient: the clipped norm is over the active block's and
    the inactive layers' together, and the inactive step uses the clipped gradient."""
    model = tiny_llama()
    opt = BlockOptimizer(model, lr=1e-2, switch_mode="ascending", start_block=1, inactive_update="sgd",
                         inactive_lr_scale=1.0)
    before = snapshot(model)
    g = reference_grads(model, [0])
    backward(model, 0)
    trained = set(opt.trainable_names) | set(opt.inactive_names)
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g[n]) for n in sorted(trained)]))
    norm = opt.clip_grad_norm_(0.01)
    torch.testing.assert_close(norm, expected, rtol=1e-5, atol=0)
    opt.step()
    coef = 0.01 / (float(expected) + 1e-6)
    n = "model.layers.3.mlp.down_proj.weight"
    torch.testing.assert_close(model.get_parameter(n).detach(), before[n] - 1e-2 * coef * g[n], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("rule", ["sgd", "signsgd"])
@pytest.mark.parametrize("dtype,rounding", [(torch.float32, "nearest"), (torch.bfloat16, "nearest"),
                                            (torch.bfloat16, "stochastic")], ids=["fp32", "bf16", "bf16_stochastic"])
def test_backward_timing_lands_the_same_update_as_step_timing(tiny_llama, rule, dtype, rounding):
    """inactive_timing=backward takes the step in the last micro-batch's backward (earlier ones accumulate) and
    frees each gradient there; the update is the one step timing takes at step(), bit for bit (same gradients,
    lr, rounding keys), across a block switch."""
    def run(timing):
        model = tiny_llama(layers=3, dtype=dtype)
        opt = BlockOptimizer(model, lr=1e-2, switch_every=2, switch_mode="ascending", inactive_update=rule,
                             inactive_rounding=rounding, inactive_timing=timing)
        micro = {"i": 0}
        opt.register_boundary_check(lambda: micro["i"] == 1)
        first = snapshot(model)
        for step in range(3):
            for i in range(2):
                micro["i"] = i
                before = snapshot(model)
                backward(model, 10 * step + i, scale=0.5)
                params = [model.get_parameter(n) for n in opt.inactive_names]
                if timing == "backward" and i == 1:  # stepped and freed inside the backward
                    assert all(p.grad is None for p in params)
                    assert any(not torch.equal(p, before[n]) for n, p in zip(opt.inactive_names, params))
                else:  # accumulating (step timing: waiting for step())
                    assert all(p.grad is not None for p in params)
                    assert all(torch.equal(p, before[n]) for n, p in zip(opt.inactive_names, params))
            opt.step()
            opt.zero_grad()
        assert opt.skipped_steps == 0
        return first, snapshot(model)

    first, at_step = run("step")
    _, in_backward = run("backward")
    assert all(torch.equal(at_step[n], in_backward[n]) for n in at_step)
    assert sum(not torch.equal(at_step[n], first[n]) for n in first) > 20  # the runs did train


def test_backward_timing_follows_replaced_parameters(tiny_llama):
    """Parameters replaced after the optimizer was built (what an engine may do) lose their hooks with them:
    rebinding hooks the new ones, so the backward still takes the step and frees their gradients."""
    model = tiny_llama()
    opt = BlockOptimizer(model, lr=1e-2, switch_mode="ascending", start_block=1, inactive_update="sgd",
                         inactive_lr_scale=1.0, inactive_timing="backward")
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
    assert opt.rebind_parameters()
    n = "model.layers.3.mlp.down_proj.weight"
    before = snapshot(model)
    g = reference_grads(model, [0])
    backward(model, 0)
    assert model.get_parameter(n).grad is None
    torch.testing.assert_close(model.get_parameter(n).detach(), before[n] - 1e-2 * g[n], rtol=1e-6, atol=1e-7)


def test_backward_timing_is_not_clipped(tiny_llama):
    """With inactive_timing=backward the inactive step is taken before clipping: the clipped norm is the active
    block's alone and the inactive step uses the whole gradient."""
    model = tiny_llama()
    opt = BlockOptimizer(model, lr=1e-2, switch_mode="ascending", start_block=1, inactive_update="sgd",
                         inactive_lr_scale=1.0, inactive_timing="backward")
    before = snapshot(model)
    g = reference_grads(model, [0])
    backward(model, 0)
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g[n]) for n in opt.trainable_names]))
    torch.testing.assert_close(opt.clip_grad_norm_(0.01), expected, rtol=1e-5, atol=0)
    opt.step()
    n = "model.layers.3.mlp.down_proj.weight"
    torch.testing.assert_close(model.get_parameter(n).detach(), before[n] - 1e-2 * g[n], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("timing", ["step", "backward"])
def test_inactive_update_in_the_hf_trainer_waits_for_the_last_micro_batch(tiny_llama, tmp_path, timing):
    """Step timing: the gradient waits until the optimizer step. Backward timing: the Trainer's sync_gradients
    tells the last micro-batch, whose backward takes the step, so the gradient is gone before the step."""
    from datasets import Dataset
    from transformers import TrainerCallback, TrainingArguments

    from badam_hf import BAdamTrainer

    model = tiny_llama()
    n = "model.layers.3.mlp.up_proj.weight"
    seen = []

    class Probe(TrainerCallback):
        def on_substep_end(self, args, state, control, **kw):  # after a micro-batch that is not the last
            seen.append(("sub", model.get_parameter(n).grad is not None))

        def on_pre_optimizer_step(self, args, state, control, **kw):  # after the last micro-batch's backward
            seen.append(("last", model.get_parameter(n).grad is not None))

        def on_step_end(self, args, state, control, **kw):
            seen.append(("step", model.get_parameter(n).grad is not None))

    ids = [batch(i, bs=1)[0].tolist() for i in range(12)]
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=3, max_steps=2,
        learning_rate=1e-2,
        optim_args=f"switch_mode=ascending,start_block=0,inactive_update=signsgd,inactive_timing={timing}",
        report_to=[], use_cpu=True, save_strategy="no", bf16=False)
    before = model.get_parameter(n).detach().clone()
    trainer = BAdamTrainer(model=model, args=args, train_dataset=data, callbacks=[Probe()])
    trainer.train()
    waiting = timing == "step"  # until the step, then consumed; or consumed in the last backward
    assert seen == [("sub", True), ("sub", True), ("last", waiting), ("step", False)] * 2
    # Two signSGD steps of 5 x lr each: every entry moved by about 2 x 0.05 (bf16-free: fp32 weights).
    delta = (model.get_parameter(n).detach() - before).abs()
    assert delta.max() <= 0.1 + 1e-6 and delta.min() > 0


# --- refusals -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    ("mode=blocks", r"mode='blocks' is not valid; choose one of 'layer', 'ratio', 'lisa'"),
    ("mode=ratio,update_ratio=0", r"update_ratio=0.0 is not valid.*\(0, 1\]"),
    ("mode=ratio,update_ratio=1.01", r"update_ratio=1.01 is not valid"),
    ("mode=ratio,mask_mode=random", r"mask_mode='random' is not valid; choose one of 'adjacent', 'scatter'"),
    ("update_ratio=0.1", r"update_ratio/mask_mode apply to mode='ratio' only"),
    ("mode=lisa,lisa_layers=0", r"lisa_layers=0 is not valid.*>= 1"),
    ("lisa_layers=4", r"lisa_layers applies to mode='lisa' only"),
    ("mode=lisa,switch_mode=ascending", r"switch_mode='ascending' orders the blocks of mode='layer'"),
    ("mode=ratio,start_block=2", r"start_block applies to mode='layer' only"),
    ("mode=lisa,include_embedding=true", r"include_embedding/include_lm_head .* mode='lisa'"),
    ("inactive_update=adam", r"inactive_update='adam' is not valid; choose one of 'none', 'sgd', 'signsgd'"),
    ("inactive_update=sgd,inactive_scope=below", r"inactive_scope='below' is not valid; choose one of 'above', 'all'"),
    ("inactive_update=sgd,inactive_lr_scale=0", r"inactive_lr_scale=0.0 is not valid"),
    ("inactive_update=sgd,inactive_lr_scale=inf", r"inactive_lr_scale=inf is not valid"),
    ("inactive_scope=all", r"configure inactive_update, which is 'none'"),
    ("inactive_update=sgd,inactive_timing=later",
     r"inactive_timing='later' is not valid; choose one of 'step', 'backward'"),
    ("inactive_timing=backward", r"inactive_timing/inactive_rounding configure inactive_update, which is 'none'"),
    ("mode=ratio,inactive_update=sgd", r"mode='ratio' has none"),
    ("mode=ratio,update_ratio=lots", r"update_ratio='lots' in optim_args is not valid; expected a number"),
])
def test_bad_combinations_are_refused_with_the_value_and_the_choices(args, message):
    with pytest.raises(BAdamConfigError, match=message):
        BAdamConfig.from_optim_args(args)


def test_mode_defaults():
    assert BAdamConfig().schedule.switch_every == 100 and BAdamConfig().mode == "layer"
    lisa = BAdamConfig.from_optim_args("mode=lisa")
    assert lisa.schedule.switch_every == 20 and lisa.lisa.lisa_layers == 2  # LISA's interval and gamma
    ratio = BAdamConfig.from_optim_args("mode=ratio")
    assert ratio.ratio.update_ratio == 0.05 and ratio.ratio.mask_mode == "adjacent"
    bread = BAdamConfig.from_optim_args("inactive_update=sgd")
    assert bread.inactive.inactive_lr_scale == 5.0 and bread.inactive.inactive_scope == "above"
    assert bread.inactive.inactive_timing == "step"


def test_engines_refuse_inactive_updates_and_zero3_modes(tiny_llama):
    from badam_hf.engines.common import check_mode_supported

    bread = BlockOptimizer(tiny_llama(), inactive_update="sgd")
    with pytest.raises(DistributedSetupError, match=r"inactive_update='sgd' is not supported under DDP.*drift"):
        check_mode_supported(bread, "DDP")
    ratio = BlockOptimizer(tiny_llama(), mode="ratio")
    check_mode_supported(ratio, "DDP")
    check_mode_supported(ratio, "FSDP2")
    with pytest.raises(DistributedSetupError, match=r"mode='ratio' is not supported under DeepSpeed ZeRO-3"):
        check_mode_supported(ratio, "DeepSpeed ZeRO-3")
