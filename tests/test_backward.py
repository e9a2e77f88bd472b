"""Backward truncation and gradient checkpointing.

The active block must get exactly the gradient of a plain full backward, with or without (reentrant or
non-reentrant) checkpointing, whether checkpointing is enabled before or after the optimizer is built,
and the backward pass must stop at the lowest active layer.
"""

import copy
import functools
import warnings

import pytest
import torch
from transformers import RobertaForSequenceClassification

from badam_hf import BlockOptimizer
from badam_hf.core import backward_truncation
from badam_hf.core.hf_features import enable_activation_checkpointing

VOCAB = 64  # the tiny models' vocabulary (tests/tiny_models.py)
MODES = [None, "non_reentrant", "reentrant"]  # None: no checkpointing


# --- tiny models (fp32, dropout 0, train mode: checkpointing acts only in training) ----------------

LLAMA = dict(max_positions=None, attention_dropout=0.0, tie_word_embeddings=False, train=True)
# The models of the tests parametrized over architectures, by family (tiny_model's first argument).
MODELS = {
    "llama": dict(layers=5, **LLAMA),
    "gpt2": dict(layers=4, max_positions=32, bos_token_id=0, eos_token_id=0, train=True),
    "roberta": dict(layers=4, classifier_dropout=0.0, num_labels=2, train=True),
}


def layers_of(model):
    for path in ("model.layers", "transformer.h", "roberta.encoder.layer"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise AssertionError(type(model))


def make_batch(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (2, 8), generator=g)
    if isinstance(model, RobertaForSequenceClassification):
        return {"input_ids": ids, "labels": torch.tensor([0, 1])}
    return {"input_ids": ids, "labels": ids}


def loss_of(model, batch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # checkpoint / use_cache notices
        return model(**batch).loss


def enable_gc(model, mode):
    if mode is not None:
        enable_activation_checkpointing(model, use_reentrant=mode == "reentrant")


def reference_grads(model, batch):
    """Grads of every parameter from a plain full backward (no checkpointing, everything trainable)."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
        p.grad = None
    loss_of(ref, batch).backward()
    return {n: p.grad for n, p in ref.named_parameters()}


class BackwardCounter:
    """Counts, per stack layer, the backward passes that reached the layer's output, and records whether
    the layer's output was part of an autograd graph at all."""

    def __init__(self, model):
        self.counts = {}
        self.recorded = {}
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers_of(model))]

    def _hook(self, i):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self.recorded[i] = out.requires_grad
            if out.requires_grad:
                out.register_hook(lambda grad: self.counts.__setitem__(i, self.counts.get(i, 0) + 1))

        return hook

    def reset(self):
        self.counts.clear()
        self.recorded.clear()

    def ran_backward(self, n_layers):
        return [self.counts.get(i, 0) for i in range(n_layers)]


def check_grads(model, opt, batch, ref):
    """Trainable params carry the reference grad; all others carry none. Returns whether bit-identical."""
    trainable = set(opt.trainable_names)
    assert trainable
    exact = True
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None, n
            torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5, msg=n)
            exact = exact and torch.equal(p.grad, ref[n])
        else:
            assert p.grad is None, n
    return exact


# --- the active block's gradient and where the backward stops -------------------------------------


@pytest.mark.parametrize("order", ["gc_before_optimizer", "gc_after_optimizer"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", list(MODELS))
def test_middle_block_grad_matches_full_backward_and_backward_stops_there(arch, mode, order, tiny_model):
    model = tiny_model(arch, **MODELS[arch])
    batch = make_batch(model)
    ref = reference_grads(model, batch)
    if order == "gc_before_optimizer":
        enable_gc(model, mode)
    opt = BlockOptimizer(model, switch_every=3, switch_mode="ascending", start_block=2, lr=1e-3)
    if order == "gc_after_optimizer":
        enable_gc(model, mode)  # re-installs HF's enable_input_require_grads hooks
    n = len(layers_of(model))
    assert opt.truncation.cut_layer == 2
    counter = BackwardCounter(model)

    loss_of(model, batch).backward()

    check_grads(model, opt, batch, ref)
    assert all(n.startswith(("model.layers.2.", "transformer.h.2.", "roberta.encoder.layer.2.", "classifier."))
               for n in opt.trainable_names)
    # Exactly the layers from the active one up ran backward (once each, reentrant recompute included).
    assert counter.ran_backward(n) == [0, 0] + [1] * (n - 2)
    # The frozen layers below did not even record a graph (HF's input-require-grads hooks are gone).
    assert [counter.recorded[i] for i in range(n)] == [False, False] + [True] * (n - 2)
    assert not any(getattr(m, "_require_grads_hooks", None) for m in model.modules())


@pytest.mark.parametrize("mode", MODES)
def test_truncation_moves_with_block_switches(mode, tiny_llama):
    model = tiny_llama(layers=5, **LLAMA)
    plain = copy.deepcopy(model)  # hook-free, checkpoint-free twin for the reference grads
    enable_gc(model, mode)
    K = 2
    opt = BlockOptimizer(model, switch_every=K, switch_mode="ascending", start_block=1, lr=1e-2)
    counter = BackwardCounter(model)
    seen = []
    for step in range(5 * K):  # a full cycle: layers 1, 2, 3, 4, then 0
        batch = make_batch(model, seed=step)
        plain.load_state_dict(model.state_dict())
        ref = reference_grads(plain, batch)  # at the current weights
        k = opt.active_block
        assert opt.truncation.cut_layer == k
        counter.reset()
        loss_of(model, batch).backward()
        check_grads(model, opt, batch, ref)
        assert counter.ran_backward(5) == [0] * k + [1] * (5 - k), (step, k)
        seen.append(k)
        opt.step()
        opt.zero_grad()
    assert seen == [1, 1, 2, 2, 3, 3, 4, 4, 0, 0]


@pytest.mark.parametrize("order", ["gc_before_optimizer", "gc_after_optimizer"])
@pytest.mark.parametrize("mode", MODES)
def test_embedding_block_backward_reaches_every_layer(mode, order, tiny_llama):
    model = tiny_llama(layers=4, **LLAMA)
    batch = make_batch(model)
    ref = reference_grads(model, batch)
    if order == "gc_before_optimizer":
        enable_gc(model, mode)
    opt = BlockOptimizer(model, switch_every=3, switch_mode="ascending", start_block=0, include_embedding=True)
    if order == "gc_after_optimizer":
        enable_gc(model, mode)
    assert opt.active_block_name == "embedding" and opt.trainable_names == ["model.embed_tokens.weight"]
    assert opt.truncation.cut_layer is None
    counter = BackwardCounter(model)
    loss_of(model, batch).backward()
    check_grads(model, opt, batch, ref)
    assert counter.ran_backward(4) == [1, 1, 1, 1]


@pytest.mark.parametrize("order", ["gc_before_optimizer", "gc_after_optimizer"])
@pytest.mark.parametrize("mode", MODES)
def test_lm_head_block_runs_no_backward_through_the_stack(mode, order, tiny_llama):
    model = tiny_llama(layers=4, **LLAMA)
    batch = make_batch(model)
    ref = reference_grads(model, batch)
    if order == "gc_before_optimizer":
        enable_gc(model, mode)
    opt = BlockOptimizer(model, switch_every=3, switch_mode="ascending", start_block=4, include_lm_head=True)
    if order == "gc_after_optimizer":
        enable_gc(model, mode)
    assert opt.active_block_name == "lm_head"
    assert set(opt.trainable_names) == {"model.norm.weight", "lm_head.weight"}
    counter = BackwardCounter(model)
    loss_of(model, batch).backward()
    check_grads(model, opt, batch, ref)
    assert counter.ran_backward(4) == [0, 0, 0, 0]
    assert not any(counter.recorded.values())


# --- the bug the fix guards against ---------------------------------------------------------------


def test_reentrant_checkpointing_without_the_fix_gives_the_active_layer_no_gradient(monkeypatch, tiny_roberta):
    """Frozen lower layers + reentrant checkpointing + no input-require-grads hook: the checkpointed active
    layer sees no input requiring grad, so it gets no gradient, and nothing fails when a task head is
    trainable. With BlockOptimizer's truncation, the same set-up gives the exact gradient."""
    base = tiny_roberta(**MODELS["roberta"])
    batch = make_batch(base)
    ref = reference_grads(base, batch)

    # 1) Manual BAdam-style freeze of all but layer 2 (+ the head), reentrant checkpointing, and no HF hook
    #    (absent e.g. for models whose main input is not input_ids, or once removed).
    manual = copy.deepcopy(base)
    enable_gc(manual, "reentrant")
    manual.disable_input_require_grads()
    for n, p in manual.named_parameters():
        p.requires_grad_(n.startswith(("roberta.encoder.layer.2.", "classifier.")))
    loss_of(manual, batch).backward()  # silently "works": the head has a grad...
    grads = dict(manual.named_parameters())
    assert grads["classifier.out_proj.weight"].grad is not None
    assert all(p.grad is None for n, p in grads.items() if n.startswith("roberta.encoder.layer.2."))  # ...layer 2 none

    # 2) Our truncation without its reentrant half (the cut input not made to require grad): same bug.
    broken = copy.deepcopy(base)
    enable_gc(broken, "reentrant")
    opt = BlockOptimizer(broken, switch_every=3, switch_mode="ascending", start_block=2)
    with monkeypatch.context() as mp:
        mp.setattr(backward_truncation, "_is_reentrant_checkpointed", lambda module: False)
        loss_of(broken, batch).backward()
    assert all(p.grad is None for n, p in broken.named_parameters() if n.startswith("roberta.encoder.layer.2."))

    # 3) The fix: exact gradient for layer 2 and the head.
    fixed = copy.deepcopy(base)
    enable_gc(fixed, "reentrant")
    opt = BlockOptimizer(fixed, switch_every=3, switch_mode="ascending", start_block=2)
    loss_of(fixed, batch).backward()
    check_grads(fixed, opt, batch, ref)


def _checkpoint_whole_call(monkeypatch, layer_cls):
    """Make `layer_cls` checkpoint its whole `__call__`, as transformers 5.18's GradientCheckpointingLayer does
    (its forward pre-hooks then run inside the checkpoint); newer releases checkpoint `forward` only."""
    monkeypatch.setattr(layer_cls, "forward", getattr(layer_cls.forward, "__wrapped__", layer_cls.forward))

    def __call__(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training:
            return self._gradient_checkpointing_func(functools.partial(torch.nn.Module.__call__, self, **kwargs), *args)
        return torch.nn.Module.__call__(self, *args, **kwargs)

    monkeypatch.setattr(layer_cls, "__call__", __call__)


@pytest.mark.parametrize("order", ["gc_before_optimizer", "gc_after_optimizer"])
@pytest.mark.parametrize("wrapped", [True, False])
def test_layers_that_checkpoint_their_whole_call_still_get_the_exact_gradient(monkeypatch, tiny_llama, wrapped,
                                                                             order):
    """Where the pre-hooks run inside the reentrant checkpoint (transformers 5.18), the cut must be made on
    the checkpoint's inputs: without that (`wrapped=False`) the active layer gets no gradient at all."""
    model = tiny_llama(layers=4, **LLAMA)
    batch = make_batch(model)
    ref = reference_grads(model, batch)
    _checkpoint_whole_call(monkeypatch, type(model.model.layers[0]))
    monkeypatch.setattr(backward_truncation, "layer_hooks_run_inside_checkpoint", lambda: wrapped)
    if order == "gc_before_optimizer":
        enable_gc(model, "reentrant")
    opt = BlockOptimizer(model, switch_every=3, switch_mode="ascending", start_block=2, lr=1e-3)
    if order == "gc_after_optimizer":
        enable_gc(model, "reentrant")  # new checkpoint functions: wrapped again before the next forward
    counter = BackwardCounter(model)
    loss_of(model, batch).backward()
    if not wrapped:
        assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("model.layers.2."))
        return
    check_grads(model, opt, batch, ref)
    assert counter.ran_backward(4) == [0, 0, 1, 1]
    opt.truncation.remove()  # the layers get their own checkpoint functions back
    assert not any(hasattr(layer._gradient_checkpointing_func, "_badam_checkpoint") for layer in model.model.layers)


@pytest.mark.parametrize("checkpointing", [None, "whole_call"])
def test_a_deep_copy_of_the_model_gets_no_backward_cut(monkeypatch, tiny_llama, checkpointing):
    """`copy.deepcopy` copies a module's hooks (and a 5.18-style wrapped checkpoint function) with the model. In
    the copy they must do nothing: its backward reaches every parameter (the plain reference gradients),
    while the original keeps its cut, and the original optimizer's gradients stay as they were."""
    model = tiny_llama(layers=4, **LLAMA)
    batch = make_batch(model)
    ref = reference_grads(model, batch)
    if checkpointing:
        _checkpoint_whole_call(monkeypatch, type(model.model.layers[0]))
        monkeypatch.setattr(backward_truncation, "layer_hooks_run_inside_checkpoint", lambda: True)
        enable_gc(model, "reentrant")
    opt = BlockOptimizer(model, switch_every=3, switch_mode="ascending", start_block=2, lr=1e-3)
    loss_of(model, batch).backward()
    held = {n: g.clone() for n, g in opt._block_masters.grads().items()}
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(True)
        p.grad = None
    counter = BackwardCounter(twin)
    loss_of(twin, batch).backward()
    assert counter.ran_backward(4) == [1, 1, 1, 1]
    for n, p in twin.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=n)
    assert all(torch.equal(g, held[n]) for n, g in opt._block_masters.grads().items())
    model.zero_grad(set_to_none=True)
    counter = BackwardCounter(model)
    loss_of(model, batch).backward()
    assert counter.ran_backward(4) == [0, 0, 1, 1]  # the original is still cut below the active layer


def test_reentrant_without_the_fix_on_a_causal_lm_has_nothing_to_backward(monkeypatch, tiny_llama):
    model = tiny_llama(layers=4, **LLAMA)
    batch = make_batch(model)
    enable_gc(model, "reentrant")
    opt = BlockOptimizer(model, switch_every=3, switch_mode="ascending", start_block=2)
    with monkeypatch.context() as mp:
        mp.setattr(backward_truncation, "_is_reentrant_checkpointed", lambda module: False)
        loss = loss_of(model, batch)
    # No trainable parameter reached the loss: the gradless guard ties it to a dummy leaf (backward would
    # otherwise fail with "does not require grad"), and the active block gets no gradient.
    assert opt.truncation.gradless_forwards == 1
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert loss_of(model, batch).requires_grad  # with the fix in place
    assert opt.truncation.gradless_forwards == 1


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_without_truncation_backward_runs_through_every_frozen_layer(mode, tiny_llama):
    """truncate_backward=False keeps HF's behaviour: right gradient, but a backward through all layers."""
    model = tiny_llama(layers=4, **LLAMA)
    batch = make_batch(model)
    ref = reference_grads(model, batch)
    enable_gc(model, mode)
    opt = BlockOptimizer(model, switch_every=3, switch_mode="ascending", start_block=2, truncate_backward=False)
    assert opt.truncation.cut_layer is None
    counter = BackwardCounter(model)
    loss_of(model, batch).backward()
    check_grads(model, opt, batch, ref)
    assert counter.ran_backward(4) == [1, 1, 1, 1]


def test_truncation_gradients_are_bit_identical_to_full_backward(tiny_llama):
    model = tiny_llama(layers=4, **LLAMA)
    batch = make_batch(model)
    ref = reference_grads(model, batch)
    opt = BlockOptimizer(model, switch_every=3, switch_mode="ascending", start_block=1)
    loss_of(model, batch).backward()
    assert check_grads(model, opt, batch, ref)


# --- eval / no_grad: the hook does nothing ---------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_hook_is_inert_without_grad(mode, tiny_llama):
    plain = tiny_llama(layers=4, **LLAMA)
    model = copy.deepcopy(plain)
    enable_gc(plain, mode)
    enable_gc(model, mode)
    BlockOptimizer(model, switch_every=3, switch_mode="ascending", start_block=2)
    batch = make_batch(model)

    seen = {}
    layers = layers_of(model)
    layers[1].register_forward_hook(lambda m, a, out: seen.__setitem__("below", out))
    layers[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("input", a[0]))  # runs after ours

    for train in (False, True):
        plain.train(train)
        model.train(train)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reentrant checkpoint: "None of the inputs have requires_grad"
            got = model(**batch).logits
            want = plain(**batch).logits
        assert torch.equal(got, want)
        assert seen["input"] is seen["below"]  # not replaced

    # Grad enabled in eval mode: the cut happens (values unchanged), without requires_grad even though
    # the layers are configured for reentrant checkpointing (they do not checkpoint in eval mode).
    model.eval()
    plain.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(model(**batch).logits, plain(**batch).logits)
    assert seen["input"] is not seen["below"] and not seen["input"].requires_grad
