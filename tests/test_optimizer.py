"""BlockOptimizer core: which parameters move, the block schedule, state freeing, weight decay, equality
with plain AdamW on the active block, LR schedulers, gradient accumulation, checkpoints and guards.

Plain PyTorch loops on tiny models built from configs (no downloads)."""

from __future__ import annotations

import functools
import gc
import weakref

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from badam_hf.core.config import BAdamConfigError
from badam_hf.core.optimizer import BlockOptimizer
import tiny_models
from tiny_models import active_names, snapshot

VOCAB = 64  # the tiny models' vocabulary (tests/tiny_models.py)
batch = functools.partial(tiny_models.batch, offset=1000)
LAYER_PREFIX = {"llama": "model.layers.", "qwen2": "model.layers.", "gpt2": "transformer.h."}


def train_step(model, opt, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def block_param_names(model, prefix: str) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith(prefix)]


def fake_grads(opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


# --- only the active block moves ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,extra",
    [
        ("llama", {}),
        ("qwen2", {}),
        ("gpt2", {}),
        ("llama", {"include_embedding": True, "include_lm_head": True}),
        ("gpt2", {"include_embedding": True, "include_lm_head": True}),
    ],
)
def test_only_active_block_changes(arch, extra, tiny_model):
    model = tiny_model(arch)
    opt = BlockOptimizer(model, lr=1e-3, switch_every=2, switch_mode="ascending", **extra)
    expected_blocks = 4 + len(extra)
    assert opt.num_blocks == expected_blocks
    seen = []
    for step in range(2 * expected_blocks + 2):
        active = active_names(opt)
        seen.append(opt.active_block)
        for n, p in model.named_parameters():
            assert p.requires_grad == (n in active), (step, n)
        before = snapshot(model)
        ids = batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (n in active), (step, n)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            if n in active:
                assert not torch.equal(p, before[n]), f"step {step}: active {n} did not change"
            else:
                assert torch.equal(p, before[n]), f"step {step}: inactive {n} changed"
    # The walk visited every block, so every parameter was checked both active and inactive.
    assert sorted(set(seen)) == list(range(expected_blocks))


def test_layer_blocks_cover_expected_names(tiny_llama):
    model = tiny_llama()
    opt = BlockOptimizer(model, switch_every=1, switch_mode="ascending")
    for i, block in enumerate(opt.partition.blocks):
        assert block.param_names == block_param_names(model, f"model.layers.{i}.")
    assert opt.partition.always_active == []


# --- every block gets exactly K steps ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ascending", "random", "descending"])
def test_every_block_gets_exactly_k_steps(mode, tiny_llama):
    model = tiny_llama()
    D, K = 4, 3
    opt = BlockOptimizer(model, lr=1e-3, switch_every=K, switch_mode=mode, seed=5)
    assert opt.num_blocks == D
    visits, in_block = [], []
    for t in range(D * K * 2):
        visits.append(opt.active_block)
        in_block.append(opt.steps_in_block)
        assert opt.global_step == t
        fake_grads(opt, t)
        opt.step()
        opt.zero_grad()
    assert in_block == [t % K for t in range(D * K * 2)]
    runs = [visits[i : i + K] for i in range(0, len(visits), K)]
    for r in runs:
        assert len(set(r)) == 1, f"a block switched inside its K steps: {visits}"
    order = [r[0] for r in runs]
    for epoch in range(2):
        assert sorted(order[epoch * D : (epoch + 1) * D]) == list(range(D)), order
    if mode == "ascending":
        assert order == [0, 1, 2, 3, 0, 1, 2, 3]
    if mode == "descending":
        assert order == [3, 2, 1, 0, 3, 2, 1, 0]
    assert all(visits.count(b) == 2 * K for b in range(D))


def test_random_order_is_reproducible_and_respects_start_block(tiny_llama):
    orders = []
    for _ in range(2):
        opt = BlockOptimizer(tiny_llama(), switch_every=1, switch_mode="random", seed=11, start_block=2)
        seq = []
        for t in range(8):
            seq.append(opt.active_block)
            fake_grads(opt, t)
            opt.step()
        orders.append(seq)
    assert orders[0] == orders[1]
    assert orders[0][0] == 2


# --- switching frees state; memory of the active block only ------------------------------------------


def _tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def test_switch_frees_previous_block_state_bf16(tiny_llama):
    model = tiny_llama(dtype=torch.bfloat16)
    K = 2
    opt = BlockOptimizer(model, lr=1e-3, switch_every=K, switch_mode="ascending")
    params = dict(model.named_parameters())
    names0 = block_param_names(model, "model.layers.0.")
    names1 = block_param_names(model, "model.layers.1.")

    # Block 0 trains; masters exist for its parameters only (from its first step on), and are fp32 copies.
    assert set(opt.masters) == set()
    train_step(model, opt, batch(0))
    assert opt.active_block == 0
    assert set(opt.masters) == set(names0)
    master_ref = weakref.ref(opt.masters[names0[0]])
    moment_ref = weakref.ref(opt.inner.state[opt.masters[names0[0]]]["exp_avg"])
    assert master_ref() is not None and moment_ref() is not None

    train_step(model, opt, batch(1))  # K-th step: switches to block 1 inside step()
    assert opt.active_block == 1
    gc.collect()
    assert master_ref() is None, "the previous block's fp32 master is still alive after the switch"
    assert moment_ref() is None, "the previous block's Adam moment is still alive after the switch"
    assert set(opt.masters) == set() and len(opt.inner.state) == 0  # nothing for block 1 until it steps

    train_step(model, opt, batch(2))
    assert set(opt.masters) == set(names1)
    masters = [opt.masters[n] for n in names1]
    assert {id(k) for k in opt.inner.state} == {id(m) for m in masters}
    assert all(m.dtype == torch.float32 for m in masters)
    assert all(params[n].dtype == torch.bfloat16 for n in params)

    numel = sum(params[n].numel() for n in names1)  # from the model, independently of the optimizer
    master_bytes = _tensor_bytes(opt.masters.values())
    moments = [v for st in opt.inner.state.values() for k, v in st.items() if k != "step"]
    steps = [st["step"] for st in opt.inner.state.values()]
    assert master_bytes == 4 * numel
    assert _tensor_bytes(moments) == 2 * 4 * numel
    assert len(steps) == len(names1) and all(s.numel() == 1 for s in steps)
    mem = opt.memory_bytes()
    assert mem["masters"] == 4 * numel
    assert mem["optimizer_state"] == 2 * 4 * numel + _tensor_bytes(steps)
    assert mem["grads"] == 0  # zero_grad(set_to_none) ran


def test_fp32_weights_have_no_masters(tiny_llama):
    model = tiny_llama()
    opt = BlockOptimizer(model, lr=1e-3, switch_every=2, switch_mode="ascending")
    params = dict(model.named_parameters())
    for t in range(3):
        train_step(model, opt, batch(t))
    assert opt.masters == {}
    names1 = block_param_names(model, "model.layers.1.")
    assert {id(k) for k in opt.inner.state} == {id(params[n]) for n in names1}
    numel = sum(params[n].numel() for n in names1)
    mem = opt.memory_bytes()
    assert mem["masters"] == 0
    steps = [st["step"] for st in opt.inner.state.values()]
    assert mem["optimizer_state"] == 2 * 4 * numel + _tensor_bytes(steps)


# --- weight decay groups -----------------------------------------------------------------------------


def _independent_decay_rule(name: str) -> bool:
    # Llama/Qwen2 spelling of HF's rule: no decay for biases and norm weights.
    return not name.endswith(".bias") and "norm" not in name


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decay_groups_follow_hf_rule(arch, dtype, tiny_model):
    from transformers import Trainer

    model = tiny_model(arch, dtype=dtype)
    hf_decay = set(Trainer.get_decay_parameter_names(None, model))
    if arch != "gpt2":
        assert hf_decay == {n for n, _ in model.named_parameters() if _independent_decay_rule(n)}
    else:  # GPT-2 norms are nn.LayerNorm modules named ln_*; HF's rule catches them by type
        assert not any(".ln_" in n or n.endswith(".bias") for n in hf_decay)
    if arch == "qwen2":
        assert any(n.endswith("q_proj.bias") for n, _ in model.named_parameters())
    opt = BlockOptimizer(model, lr=1e-3, weight_decay=0.1, switch_every=1, switch_mode="ascending")
    params = dict(model.named_parameters())
    for t in range(opt.num_blocks):
        active = [n for n in params if n in active_names(opt)]
        decay = [n for n in active if n in hf_decay]
        no_decay = [n for n in active if n not in hf_decay]
        assert decay and no_decay
        assert [id(p) for p in opt.param_groups[0]["params"]] == [id(params[n]) for n in decay]
        assert [id(p) for p in opt.param_groups[1]["params"]] == [id(params[n]) for n in no_decay]
        assert len(opt.inner.param_groups[1]["params"]) == len(no_decay)
        assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
        fake_grads(opt, t)
        # The inner optimizer updates the fp32 masters (bf16; made at the block's first step) or the weights.
        seen = []
        h = opt.inner.register_step_pre_hook(lambda o, a, k: seen.append((
            [id(p) for p in o.param_groups[0]["params"]],
            [id(opt.masters[n] if dtype != torch.float32 else params[n]) for n in decay])))
        opt.step()
        h.remove()
        assert len(seen) == 1 and seen[0][0] == seen[0][1]
        assert opt.inner.param_groups[0]["weight_decay"] == 0.1
        assert opt.inner.param_groups[1]["weight_decay"] == 0.0
        opt.zero_grad()


@pytest.mark.parametrize("wd", [0.1, 0.0])
def test_weight_decay_value_is_the_users(wd, tiny_llama):
    """With a zero gradient AdamW's update is pure decay: p * (1 - lr*wd) on the decay group, nothing on
    the no-decay group. wd=0.0 must leave everything untouched (AdamW's default 0.01 must not leak in)."""
    model = tiny_llama()
    lr = 1e-2
    opt = BlockOptimizer(model, lr=lr, weight_decay=wd, switch_every=3, switch_mode="ascending")
    before = snapshot(model)
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    for n, p in model.named_parameters():
        if id(p) in decay:
            expected = before[n] * (1 - lr * wd)
            assert torch.equal(p, expected), n
            if wd > 0:
                assert not torch.equal(p, before[n])
        else:
            assert torch.equal(p, before[n]), n


# --- equality with plain AdamW on the active block ---------------------------------------------------


def _assert_same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if not torch.equal(a, b):
        diff = (a - b).abs().max().item()
        assert diff <= 1e-7, f"{what}: max diff {diff}"


@pytest.mark.parametrize("start", [0, 2])
def test_matches_plain_adamw_on_active_block_fp32(start, tiny_llama):
    K, lr, wd = 3, 1e-3, 0.1
    model = tiny_llama()
    ref = tiny_llama()
    ref.load_state_dict(model.state_dict())
    opt = BlockOptimizer(
        model, lr=lr, weight_decay=wd, betas=(0.9, 0.95), eps=1e-6,
        switch_every=K, switch_mode="ascending", start_block=start,
    )
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, ref))
    ref_params = dict(ref.named_parameters())
    step = 0
    for block in (start, (start + 1) % 4):
        names = block_param_names(ref, f"model.layers.{block}.")
        for n, p in ref_params.items():
            p.requires_grad_(n in names)
        # A fresh AdamW per block: BAdam restarts the moments at each switch.
        ref_opt = torch.optim.AdamW(
            [
                {"params": [ref_params[n] for n in names if n in decay], "weight_decay": wd},
                {"params": [ref_params[n] for n in names if n not in decay], "weight_decay": 0.0},
            ],
            lr=lr, betas=(0.9, 0.95), eps=1e-6, fused=True,  # BAdam's inner AdamW runs torch's fused kernel
        )
        for _ in range(K):
            assert opt.active_block == block
            ids = batch(step)
            train_step(model, opt, ids)
            train_step(ref, ref_opt, ids)
            for n, p in model.named_parameters():
                _assert_same(p, ref_params[n], f"step {step} {n}")
            step += 1


# --- LR schedules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup])
@pytest.mark.parametrize("inner", ["adamw", "sgd"])
def test_lr_schedule_matches_plain_optimizer(factory, inner, tiny_llama):
    N, K, lr = 14, 3, 1e-2
    model = tiny_llama()
    plain_model = tiny_llama()
    kwargs = {"inner_kwargs": {"momentum": 0.0}} if inner == "sgd" else {}
    opt = BlockOptimizer(model, lr=lr, switch_every=K, switch_mode="ascending", inner_optimizer=inner, **kwargs)
    plain = (torch.optim.SGD if inner == "sgd" else torch.optim.AdamW)(plain_model.parameters(), lr=lr)
    sched = factory(opt, num_warmup_steps=3, num_training_steps=N)
    plain_sched = factory(plain, num_warmup_steps=3, num_training_steps=N)
    lrs = []
    for t in range(N):
        want = plain.param_groups[0]["lr"]
        assert [g["lr"] for g in opt.param_groups] == [want, want]
        stepped = [p for g in opt.param_groups for p in g["params"]]  # the groups change at a switch
        before = [p.detach().clone() for p in stepped]
        fake_grads(opt, t)
        grads = [p.grad.clone() for p in stepped]
        for p in plain_model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        plain.step()
        # The inner optimizer ran with the scheduled lr ...
        assert [g["lr"] for g in opt.inner.param_groups] == [want, want]
        if inner == "sgd":  # ... and the update shows it: p - lr_t * g exactly
            for p, p0, g in zip(stepped, before, grads):
                assert torch.equal(p, p0.add(g, alpha=-want))
        opt.zero_grad()
        sched.step()
        plain_sched.step()
        assert sched.get_last_lr() == [plain_sched.get_last_lr()[0]] * 2
        lrs.append(want)
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(lr) and len(set(lrs)) > 5
    assert opt.global_step == N and opt.active_block == (N // K) % 4


# --- gradient accumulation ---------------------------------------------------------------------------


def test_gradient_accumulation_equals_big_batch(tiny_llama):
    GA, lr = 4, 1e-3
    big_model, acc_model = tiny_llama(), tiny_llama()
    # eps=1e-6: with the default 1e-8 a few gradient entries of the tiny model sit near eps, where Adam's
    # g / (|g| + eps) magnifies the summation-order difference of the two computations far beyond 1e-6.
    big = BlockOptimizer(big_model, lr=lr, eps=1e-6, switch_every=2, switch_mode="ascending")
    acc = BlockOptimizer(acc_model, lr=lr, eps=1e-6, switch_every=2, switch_mode="ascending")
    for step in range(3):  # crosses one switch
        ids = batch(step, bs=GA, seq=8)  # equal-length sequences: no padding
        big_model(input_ids=ids, labels=ids).loss.backward()
        for i in range(GA):
            one = ids[i : i + 1]
            (acc_model(input_ids=one, labels=one).loss / GA).backward()
        for (n, p), q in zip(big_model.named_parameters(), acc_model.parameters()):
            assert (p.grad is None) == (q.grad is None), n
            if p.grad is not None:
                assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=0), n
        big.step()
        acc.step()
        big.zero_grad()
        acc.zero_grad()
        for (n, p), q in zip(big_model.named_parameters(), acc_model.parameters()):
            assert torch.allclose(p, q, atol=1e-6, rtol=0), (step, n)
    assert big.active_block == acc.active_block == 1


# --- state_dict round trip ---------------------------------------------------------------------------


def _resume_pair(tiny_llama, tmp_path, mode="random", seed=7, K=3, warm=4):
    model = tiny_llama(dtype=torch.bfloat16)
    opt = BlockOptimizer(model, lr=1e-2, weight_decay=0.1, switch_every=K, switch_mode=mode, seed=seed)
    for t in range(warm):
        train_step(model, opt, batch(t))
    sd = opt.state_dict()
    path = tmp_path / "optim.pt"
    torch.save(sd, path)
    return model, opt, sd, path


def test_state_dict_round_trip_is_exact_bf16(tmp_path, tiny_llama):
    K = 3
    model, opt, sd, path = _resume_pair(tiny_llama, tmp_path, K=K, warm=4)
    assert opt.steps_in_block == 1  # mid-block
    badam = sd["badam"]
    assert badam["block"] == opt.active_block and badam["steps_in_block"] == 1 and badam["step"] == 4
    assert badam["seed"] == 7 and badam["switch_every"] == K and badam["switch_mode"] == "random"
    assert sorted(badam["order"]) == list(range(4)) and badam["order"][1] == opt.active_block
    active = block_param_names(model, f"model.layers.{opt.active_block}.")
    names = [n for n, _ in model.named_parameters()]
    assert sorted(names[int(i)] for i in sd["state"]) == sorted(active)
    for entry in sd["state"].values():
        assert entry["master"].dtype == torch.float32
        assert {"exp_avg", "exp_avg_sq", "step"} <= set(entry)

    # A fresh model (same weights) and a fresh optimizer, loaded from disk.
    model2 = tiny_llama(dtype=torch.bfloat16, seed=123)
    model2.load_state_dict(model.state_dict())
    opt2 = BlockOptimizer(model2, lr=1e-2, weight_decay=0.1, switch_every=K, switch_mode="random", seed=7)
    loaded = torch.load(path, weights_only=True)
    opt2.load_state_dict(loaded)
    assert (opt2.global_step, opt2.active_block, opt2.steps_in_block) == (4, opt.active_block, 1)
    for n in active:
        assert torch.equal(opt2.masters[n], opt.masters[n])
    for n, p in model2.named_parameters():
        assert p.requires_grad == (n in set(active)), n

    blocks_seen = {opt.active_block}
    for t in range(4, 4 + 2 * K + 1):  # continue across at least two switches
        train_step(model, opt, batch(t))
        train_step(model2, opt2, batch(t))
        assert opt2.active_block == opt.active_block
        blocks_seen.add(opt.active_block)
        for (n, p), q in zip(model.named_parameters(), model2.parameters()):
            assert torch.equal(p, q), (t, n)
    assert len(blocks_seen) >= 3


def test_state_dict_without_master_restore_would_differ(tmp_path, tiny_llama):
    """Sanity of the round-trip test: bf16 rounding makes the fp32 masters matter."""
    model, opt, sd, _ = _resume_pair(tiny_llama, tmp_path, warm=4)
    master_vals = [e["master"] for e in sd["state"].values()]
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    rounded = [params[names[int(i)]].float() for i in sd["state"]]
    assert any(not torch.equal(m, r) for m, r in zip(master_vals, rounded))


def test_load_state_dict_errors(tmp_path, tiny_llama):
    model, opt, sd, _ = _resume_pair(tiny_llama, tmp_path, mode="random", seed=7, K=3, warm=2)

    fresh = tiny_llama(dtype=torch.bfloat16)
    other = BlockOptimizer(fresh, switch_every=3, switch_mode="random", seed=7)
    plain = torch.optim.AdamW(tiny_llama().parameters()).state_dict()
    with pytest.raises(ValueError, match="no 'badam' entry"):
        other.load_state_dict(plain)

    shallow = BlockOptimizer(tiny_llama(layers=3, dtype=torch.bfloat16), switch_every=3, switch_mode="random", seed=7)
    with pytest.raises(ValueError, match=r"blocks \(4.*differ.*\(3"):
        shallow.load_state_dict(sd)

    for kwargs, key in (
        ({"switch_every": 5, "switch_mode": "random", "seed": 7}, "switch_every"),
        ({"switch_every": 3, "switch_mode": "ascending", "seed": 7}, "switch_mode"),
        ({"switch_every": 3, "switch_mode": "random", "seed": 8}, "seed"),
    ):
        mismatched = BlockOptimizer(tiny_llama(dtype=torch.bfloat16), **kwargs)
        with pytest.raises(ValueError, match=rf"saved with {key}="):
            mismatched.load_state_dict(sd)


# --- inner optimizer choice --------------------------------------------------------------------------


def test_inner_sgd_is_plain_gradient_step(tiny_llama):
    lr = 0.05
    model = tiny_llama()
    opt = BlockOptimizer(model, lr=lr, inner_optimizer="sgd", inner_kwargs={"momentum": 0.0},
                         switch_every=2, switch_mode="ascending")
    assert isinstance(opt.inner, torch.optim.SGD)
    for t in range(3):
        active = set(active_names(opt))
        before = snapshot(model)
        ids = batch(t)
        model(input_ids=ids, labels=ids).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert set(grads) == active
        opt.step()
        opt.zero_grad()
        for n, p in model.named_parameters():
            if n in active:
                assert torch.equal(p, before[n].add(grads[n], alpha=-lr)), n
            else:
                assert torch.equal(p, before[n]), n


def test_inner_optimizer_dotted_path(tiny_llama):
    model = tiny_llama()
    opt = BlockOptimizer(model, lr=0.1, inner_optimizer="torch.optim.Adagrad", switch_every=2,
                         switch_mode="ascending")
    assert type(opt.inner) is torch.optim.Adagrad
    for t in range(3):
        active = active_names(opt)
        before = snapshot(model)
        train_step(model, opt, batch(t))
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]) == (n not in active), n
    assert opt.active_block == 1
    assert all("sum" in st for st in opt.inner.state.values()) and len(opt.inner.state) > 0


def test_unknown_inner_optimizer_is_refused(tiny_llama):
    with pytest.raises(BAdamConfigError, match="inner_optimizer"):
        BlockOptimizer(tiny_llama(), inner_optimizer="torch.optim.NoSuchThing")


# --- guards ------------------------------------------------------------------------------------------


def test_no_train_or_eval_methods(tiny_llama):
    opt = BlockOptimizer(tiny_llama())
    assert not hasattr(opt, "train")
    assert not hasattr(opt, "eval")


def test_peft_model_is_refused(tiny_llama):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=2))
    with pytest.raises(BAdamConfigError, match="PEFT"):
        BlockOptimizer(peft_model)


def test_more_than_one_process_is_refused(monkeypatch, tiny_llama):
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = tiny_llama()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"2 processes"):
        BlockOptimizer(model)
    assert [p.requires_grad for p in model.parameters()] == flags  # refused before touching the model


def test_config_and_flat_kwargs_together_are_refused(tiny_llama):
    from badam_hf.core.config import BAdamConfig

    with pytest.raises(BAdamConfigError, match="not both"):
        BlockOptimizer(tiny_llama(), BAdamConfig(), switch_every=3)


# --- always-active task head ------------------------------------------------------------------------


def test_always_active_head_keeps_master_and_moments_across_switches(tiny_llama):
    model = tiny_llama(dtype=torch.bfloat16, head="classification", num_labels=3, pad_token_id=0)
    opt = BlockOptimizer(model, lr=1e-2, switch_every=2, switch_mode="ascending")
    assert opt.partition.always_active == ["score.weight"]
    head = dict(model.named_parameters())["score.weight"]
    master = None
    labels = torch.tensor([0, 2])
    for t in range(5):  # two switches
        block = opt.active_block
        assert head.requires_grad
        before = head.detach().clone()
        ids = batch(t) % (VOCAB - 1) + 1  # no pad token: every sequence is full length
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        master = master if master is not None else opt.masters["score.weight"]  # made at the first step
        # The head's master lives on; the block's masters are made at the block's first step.
        expected = {"score.weight"} | (set(block_param_names(model, f"model.layers.{block}.")) if block ==
                                       opt.active_block else set())
        assert set(opt.masters) == expected
        assert not torch.equal(head, before)
        # Same master object and one Adam state whose step count runs on over the switches.
        assert opt.masters["score.weight"] is master
        assert opt.inner.state[master]["step"].item() == t + 1
    assert opt.active_block == 2


def test_a_block_drawn_again_at_an_epoch_boundary_restarts(tiny_llama):
    """Random order with seed 0 over 2 blocks draws [0, 1] then [1, 0]: block 1 gets two visits in a row. Each
    visit is its own K steps: the first ends with the switch write-back (switch_rounding) and the second starts
    with fresh masters and moments, as the authors' package restarts it."""
    model = tiny_llama(layers=2, dtype=torch.bfloat16)
    opt = BlockOptimizer(model, lr=1e-3, switch_every=2, switch_mode="random", seed=0, switch_rounding="stochastic")
    assert [opt.schedule.block_at(s) for s in range(8)] == [0, 0, 1, 1, 1, 1, 0, 0]
    writes = []
    store = opt._block_masters.store
    opt._block_masters.store = lambda **kw: (writes.append((kw.get("step"), kw.get("block_ends"))), store(**kw))[1]
    for step in range(4):
        train_step(model, opt, batch(step))
    assert writes[-1] == (4, True)  # the first visit's last step is a block end
    assert opt.active_block == 1 and opt.memory_bytes()["masters"] == 0 and not opt.inner.state
    train_step(model, opt, batch(4))
    steps = {float(st["step"]) for st in opt.inner.state.values()}
    assert steps == {1.0}  # the moments restarted with the visit


# --- a second optimizer on the same model (a second training stage) -------------------------------------


def hook_count(model) -> int:
    """Forward/backward hooks on every module, and gradient hooks on every parameter."""
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
    for p in model.parameters():
        n += len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) + len(p._backward_hooks or {})
    return n


@pytest.mark.parametrize("extra", [{}, {"inactive_update": "sgd", "inactive_scope": "all"}], ids=["layer", "bread"])
def test_a_second_optimizer_closes_the_first_and_trains_every_block(tiny_llama, extra, caplog):
    """Issue 28's repro: a descending first stage, then a second optimizer (K=1 ascending, 4 steps). The first
    one's truncation hooks used to cut the second's backward at its own lowest layer (2), and its fp32-gradient
    hooks took the gradients: layers 0 and 1 never moved."""
    import logging

    from badam_hf.core.errors import ClosedOptimizerError

    model = tiny_llama(layers=4, dtype=torch.bfloat16)
    model.model.embed_tokens.weight.requires_grad_(False)  # the user's own choice: put back by close()
    before_hooks = hook_count(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    first = BlockOptimizer(model, lr=1e-3, switch_every=2, switch_mode="descending", **extra)
    for step in range(3):  # layers 3, 3, 2: layer 2 is mid-visit, with masters and moments
        train_step(model, first, batch(step))
    ids = batch(3)
    model(input_ids=ids, labels=ids).loss.backward()  # and gradients waiting for a step
    held = first.memory_bytes()
    assert held["masters"] > 0 and held["optimizer_state"] > 0 and held["grads"] > 0
    assert hook_count(model) > before_hooks
    master_refs = [weakref.ref(t) for t in first._block_masters.masters.values()]

    with caplog.at_level(logging.INFO, logger="badam_hf"):
        second = BlockOptimizer(model, lr=1e-3, switch_every=1, switch_mode="ascending")
    assert first.closed and sum("closing the BlockOptimizer already training this model" in r.getMessage()
                                for r in caplog.records) == 1
    assert set(first.memory_bytes().values()) == {0} and not first.inner.state
    with pytest.raises(ClosedOptimizerError, match="closed"):
        first.step()
    first.close()  # idempotent
    first_ref = weakref.ref(first)
    del first
    gc.collect()
    assert first_ref() is None, "something still holds the first optimizer"
    assert all(r() is None for r in master_refs)

    start = snapshot(model)
    for step in range(4):
        train_step(model, second, batch(10 + step))
    end = snapshot(model)
    for layer in range(4):
        names = block_param_names(model, f"model.layers.{layer}.")
        assert any(not torch.equal(start[n], end[n]) for n in names), f"layer {layer} never moved"

    second.close()
    assert hook_count(model) == before_hooks
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_close_puts_back_hf_input_require_grads_hooks(tiny_llama):
    model = tiny_llama(layers=2)
    model.enable_input_require_grads()
    opt = BlockOptimizer(model, lr=1e-3)
    assert not model._require_grads_hooks  # the truncation makes them unnecessary (and harmful)
    opt.close()
    assert len(model._require_grads_hooks) == 1
    out = model.model.embed_tokens(torch.zeros(1, 2, dtype=torch.long))
    assert out.requires_grad


def test_state_dict_masters_are_cpu_copies_of_the_masters(tiny_llama):
    """Masters held split are rebuilt one at a time and saved as CPU tensors, bit-equal to the masters; the
    optimizer keeps them split (a save changes nothing)."""
    model = tiny_llama(dtype=torch.bfloat16)
    opt = BlockOptimizer(model, lr=1e-3, switch_every=3, switch_mode="ascending")
    train_step(model, opt, batch(0))
    assert all(b.is_split for b in opt._block_masters.buffers)
    sd = opt.state_dict()
    assert all(b.is_split for b in opt._block_masters.buffers)
    saved = {opt._names[i]: e["master"] for i, e in sd["state"].items()}
    assert set(saved) == set(opt.trainable_names)
    for n, m in saved.items():
        assert m.device.type == "cpu" and m.dtype == torch.float32
        assert torch.equal(m, opt._block_masters.value(n)), n


def test_a_refused_second_optimizer_leaves_the_first_one_training(tiny_llama):
    model = tiny_llama(layers=2)
    first = BlockOptimizer(model, lr=1e-3, switch_every=2, switch_mode="ascending")
    with pytest.raises(BAdamConfigError, match="start_block=9 is out of range"):
        BlockOptimizer(model, lr=1e-3, start_block=9)
    assert not first.closed
    train_step(model, first, batch(0))
    assert first.global_step == 1
