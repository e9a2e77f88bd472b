"""Mixture-of-experts models (Qwen3-MoE, Qwen2-MoE, Mixtral, DeepSeek-V3, GPT-OSS) on tiny random-init configs.

What is locked here: a block is one decoder layer holding its attention, its router and every expert (the
experts are fused 3-D tensors, so they cannot be split per expert: `granularity=matrix` puts all of them in one
block); the router's auxiliary load-balancing loss stays in the loss and its gradient reaches the active
router exactly; modes ratio and lisa train what they should; `badam-hf estimate` counts a whole MoE layer.
DDP is not run here (two processes on this 2-core machine cost more than the tests below together); the DDP
engine does not look at the layer's contents, so nothing MoE-specific is expected there.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from tiny_multimodal import MOE_FAMILIES, lm_batch, tiny_moe

from badam_hf import BlockOptimizer
from badam_hf.core.config import PartitionConfig
from badam_hf.core.partition import partition_model
from badam_hf.tools.estimate import estimate

WITH_AUX = [f for f in MOE_FAMILIES if f != "deepseek_v3"]  # DeepSeek-V3 has no auxiliary loss in transformers


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def router_of(names, i):
    return [n for n in names if n.startswith(f"model.layers.{i}.mlp.") and n.split(".")[4] in ("gate", "router")]


def experts_of(names, i):
    return [n for n in names if n.startswith(f"model.layers.{i}.mlp.experts.")]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_a_block_is_a_whole_layer_with_router_and_every_expert(family):
    model = tiny_moe(family, layers=3)
    names = list(dict(model.named_parameters()))
    part = partition_model(model)
    assert part.names == [f"model.layers.{i}" for i in range(3)]
    for i, block in enumerate(part.blocks):
        assert block.param_names == [n for n in names if n.startswith(f"model.layers.{i}.")]
    n_experts = model.model.layers[2].mlp.experts.gate_up_proj.shape[0]
    assert n_experts == 4  # fused: one tensor holds all 4 experts
    assert router_of(part.blocks[2].param_names, 2) and experts_of(part.blocks[2].param_names, 2)
    # granularity=matrix: the experts' fused tensors are one block (with their biases, GPT-OSS), the router another.
    matrix = partition_model(model, PartitionConfig(granularity="matrix"))
    experts = {b.name: b.param_names for b in matrix.blocks}["model.layers.2.mlp.experts"]
    assert experts == experts_of(names, 2)


@pytest.mark.parametrize("family", WITH_AUX)
def test_router_aux_loss_is_in_the_loss_and_the_active_block_gets_its_exact_gradient(family):
    model = tiny_moe(family, layers=3)
    batch = lm_batch()
    out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    coef = model.config.router_aux_loss_coef
    assert out.aux_loss is not None and float(out.aux_loss.detach()) > 0
    torch.testing.assert_close(out.loss, ce + coef * out.aux_loss)

    ref = copy.deepcopy(model)
    ref(**batch).loss.backward()
    no_aux = copy.deepcopy(model)
    no_aux.config.output_router_logits = False
    no_aux(**batch).loss.backward()
    opt = BlockOptimizer(model, switch_every=2, switch_mode="ascending", start_block=1)
    assert opt.truncation.cut_layer == 1
    model(**batch).loss.backward()
    refs, plain = dict(ref.named_parameters()), dict(no_aux.named_parameters())
    for n, p in model.named_parameters():
        if n in set(opt.trainable_names):
            torch.testing.assert_close(p.grad, refs[n].grad, atol=1e-6, rtol=1e-5, msg=n)
        else:
            assert p.grad is None, n
    router = router_of(opt.trainable_names, 1)[0]
    assert not torch.allclose(refs[router].grad, plain[router].grad)  # the aux loss moves the router


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_layer_mode_two_block_epochs_train_router_and_experts_of_the_active_layer_only(family):
    model = tiny_moe(family, layers=2)
    opt = BlockOptimizer(model, switch_every=2, lr=1e-2)
    seen = set()
    for step in range(8):
        block = opt.active_block
        active = set(opt.partition.blocks[block].param_names)
        before = snapshot(model)
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        moved = changed(model, before)
        assert moved <= active
        # Router and experts moved (DeepSeek-V3's layer 0 is dense: first_k_dense_replace=1).
        assert set(router_of(moved, block)) == set(router_of(active, block)), (step, block)
        assert set(experts_of(moved, block)) == set(experts_of(active, block)), (step, block)
        assert moved
        seen.add(block)
    assert seen == {0, 1}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_ratio_mode_trains_a_fraction_of_every_expert_tensor(family):
    model = tiny_moe(family, layers=2)
    opt = BlockOptimizer(model, mode="ratio", update_ratio=0.25, switch_every=2, lr=1e-2)
    for step in range(4):
        before = snapshot(model)
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        params = dict(model.named_parameters())
        for n in experts_of(params, 0) + experts_of(params, 1):
            diff = int((params[n] != before[n]).sum())
            assert 0 < diff <= max(1, int(0.25 * params[n].numel())), (step, n, diff)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_lisa_mode_trains_the_sampled_layers_and_the_outside(family):
    model = tiny_moe(family, layers=3)
    opt = BlockOptimizer(model, mode="lisa", lisa_layers=1, switch_every=2, lr=1e-2)
    outside = set(opt.partition.always_active)
    assert outside == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for step in range(6):
        (block,) = opt.active_blocks
        before = snapshot(model)
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        moved = changed(model, before)
        assert moved <= set(opt.partition.blocks[block].param_names) | outside
        assert experts_of(moved, block) and outside <= moved


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_estimate_counts_a_whole_moe_layer(family, tmp_path):
    """`badam-hf estimate` on a config.json: the largest block is a whole layer, all experts included."""
    model = tiny_moe(family, layers=2)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(model.config.to_dict()))
    info, rows = estimate(str(path), seq=16)
    layer = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.0."))
    experts = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.0.mlp.experts."))
    assert info["largest_block"] == layer and experts > layer / 3
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    badam = {r.method: r for r in rows}["BAdam"]
    assert badam.optimizer_states == 12 * layer and badam.gradients == 4 * layer
