"""Parity with the authors' reference implementation (PyPI `badam`, `badam.BlockOptimizer`).

In the settings where the reference is correct (fp32 weights, AdamW without weight decay, ascending
order, layer blocks) our optimizer must produce the same weights after every step. The second part
documents, with the reference itself, where we deliberately differ.
"""

import copy
import warnings

import badam  # the authors' package (test extra)
import pytest
import torch

from badam_hf import BlockOptimizer

VOCAB = 64  # the tiny models' vocabulary (tests/tiny_models.py)
# The models compared: fp32, dropout 0, untied LM head, LlamaConfig's default max_position_embeddings, train mode.
MODEL = dict(max_positions=None, attention_dropout=0.0, tie_word_embeddings=False, train=True)


def batch(step):
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(step))
    return {"input_ids": ids, "labels": ids}


def reference(model, layers, K, lr, weight_decay=0.0):
    # The same AdamW kernel as ours (fused): the comparison is of the block algorithms, not of torch's kernels.
    base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "BAdam expect model to be loaded in fp16/bf16 precision"
        return badam.BlockOptimizer(
            base,
            list(model.named_parameters()),
            block_prefix_list=[[f"model.layers.{i}."] for i in range(layers)],
            switch_block_every=K,
            switch_mode="ascending",
            start_block=0,
            include_embedding=False,
            include_lm_head=False,
            verbose=0,
        )


def train_step(model, opt, step):
    model(**batch(step)).loss.backward()
    opt.step()
    opt.zero_grad()


def trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def layer_params(model, i):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(f"model.layers.{i}.")}


def test_same_weights_as_reference_after_every_step(tiny_llama):
    L, K, lr = 4, 3, 1e-2
    ours_model = tiny_llama(L, **MODEL)
    ref_model = copy.deepcopy(ours_model)
    init = {n: p.detach().clone() for n, p in ours_model.named_parameters()}
    ref = reference(ref_model, L, K, lr)
    ours = BlockOptimizer(ours_model, lr=lr, weight_decay=0.0, switch_every=K, switch_mode="ascending", start_block=0)
    # The reference gives its first block K-1 steps; a fresh optimizer placed one step into block 0 matches.
    ours.seek(1)

    max_diff = 0.0
    for step in range(3 * L * K):
        assert trainable(ours_model) == trainable(ref_model), step
        active = ours.active_block
        before = layer_params(ours_model, active)
        train_step(ours_model, ours, step)
        train_step(ref_model, ref, step)
        # Not vacuous: the active layer moved.
        assert all(not torch.equal(before[n], p) for n, p in layer_params(ours_model, active).items())
        for (n, a), (m, b) in zip(ours_model.named_parameters(), ref_model.named_parameters()):
            assert n == m
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=f"step {step}: {n}")
            max_diff = max(max_diff, (a - b).abs().max().item())
    # Observed: bit-identical (same AdamW arithmetic on the same fp32 values).
    assert max_diff == 0.0
    changed = {n for n, p in ours_model.named_parameters() if not torch.equal(p, init[n])}
    assert changed == {n for n in init if n.startswith("model.layers.")}


def test_documented_difference_first_block_gets_all_k_steps(tiny_llama):
    """The reference switches after K-1 steps of its first block; ours gives every block K steps."""
    L, K, lr = 4, 3, 1e-2
    ours_model = tiny_llama(L, **MODEL)
    ref_model = copy.deepcopy(ours_model)
    layer1 = layer_params(ours_model, 1)
    ref = reference(ref_model, L, K, lr)
    ours = BlockOptimizer(ours_model, lr=lr, switch_every=K, switch_mode="ascending", start_block=0)

    for step in range(K - 1):
        train_step(ours_model, ours, step)
        train_step(ref_model, ref, step)
    assert all(torch.equal(a, b) for a, b in zip(ours_model.parameters(), ref_model.parameters()))
    assert ours.active_block == 0 and ours.steps_in_block == K - 1
    assert all(n.startswith("model.layers.1.") for n in trainable(ref_model))  # reference already on layer 1
    assert all(n.startswith("model.layers.0.") for n in trainable(ours_model))

    train_step(ours_model, ours, K - 1)
    train_step(ref_model, ref, K - 1)
    # Step K went to layer 0 in ours, to layer 1 in the reference.
    assert all(torch.equal(layer1[n], p) for n, p in layer_params(ours_model, 1).items())
    assert all(not torch.equal(layer1[n], p) for n, p in layer_params(ref_model, 1).items())
    assert ours.active_block == 1


def test_documented_difference_no_weight_decay_on_norms_and_biases(tiny_llama):
    """The reference builds its groups as {"weight_decay": wd, **base.defaults}, so the base optimizer's
    weight decay overrides the 0.0 of its no-decay group, and it tests `isinstance(param, <LayerNorm
    classes>)` on a Parameter, which never holds: every norm weight and bias gets decay. Ours follows HF
    Trainer's rule: decay for weight matrices only."""
    L, K, lr, wd = 2, 3, 1e-2, 0.5
    ours_model = tiny_llama(L, attention_bias=True, **MODEL)
    with torch.no_grad():  # biases start at zero, where decay would be invisible
        for n, p in ours_model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0.0, 0.5)
    ours_nodecay_model = copy.deepcopy(ours_model)
    ref_model = copy.deepcopy(ours_model)
    init = layer_params(ours_model, 0)
    ref = reference(ref_model, L, K, lr, weight_decay=wd)
    ours = BlockOptimizer(ours_model, lr=lr, weight_decay=wd, switch_every=K, switch_mode="ascending", start_block=0)
    ours_nodecay = BlockOptimizer(ours_nodecay_model, lr=lr, weight_decay=0.0, switch_every=K,
                                  switch_mode="ascending", start_block=0)

    assert [g["weight_decay"] for g in ref.base_optimizer.param_groups] == [wd, wd]
    assert [g["weight_decay"] for g in ours.inner.param_groups] == [wd, 0.0]

    for opt, model in ((ours, ours_model), (ours_nodecay, ours_nodecay_model), (ref, ref_model)):
        train_step(model, opt, 0)
    got, nodecay, want_ref = (layer_params(m, 0) for m in (ours_model, ours_nodecay_model, ref_model))

    no_decay = [n for n in init if n.endswith(("norm.weight", ".bias"))]
    decay = [n for n in init if n not in no_decay]
    assert any(n.endswith("norm.weight") for n in no_decay) and any(n.endswith(".bias") for n in no_decay)
    for n in no_decay:
        assert torch.equal(got[n], nodecay[n]), n  # ours: untouched by weight decay
        assert not torch.equal(want_ref[n], got[n]), n
        # AdamW's decoupled decay: the reference additionally shrinks by lr * wd * p.
        torch.testing.assert_close(want_ref[n], got[n] - lr * wd * init[n], atol=1e-6, rtol=1e-5)
    for n in decay:
        assert torch.equal(got[n], want_ref[n]), n  # both decay weight matrices, identically
        assert not torch.equal(got[n], nodecay[n]), n
