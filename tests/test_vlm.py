"""Vision-language models (Llava, Qwen2-VL, Qwen2.5-VL, Gemma 3, Qwen3-VL) on tiny random-init configs.

By default the blocks are the language model's layers; the vision tower and the projector stay frozen,
bit for bit. `include_projector` trains the projector in every block, `include_vision` adds the vision
layers as blocks after the language ones (leaving out a layer the model never reads). A block that gets no
gradient (a vision layer on a text-only batch) is a logged no-op step that counts towards switch_every. Every
test runs with image batches and with text-only batches.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from tiny_multimodal import VLM_FAMILIES, VLMDataset, tiny_vlm, vlm_batch, vlm_collate
from transformers import Trainer, TrainingArguments

from badam_hf import BAdamConfig, BAdamConfigError, BAdamTrainer, BlockOptimizer
from badam_hf.core.config import PartitionConfig
from badam_hf.core.hf_features import enable_activation_checkpointing
from badam_hf.core.optimizer import partition_for, unwrap_optimizer
from badam_hf.core.partition import find_multimodal, partition_model

LOG = "badam_hf.core.backward_truncation"
BATCHES = ["image", "text", "mixed"]  # each step's batch: with images, text only, or alternating


def batch_for(model, kind: str, step: int) -> dict:
    images = {"image": True, "text": False, "mixed": step % 2 == 0}[kind]
    return vlm_batch(model, images=images, seed=step)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def block_params(opt, blocks) -> set[str]:
    return {n for b in blocks for n in opt.partition.blocks[b].param_names}


def language_layers(model) -> list[str]:
    mm = find_multimodal(model)
    return [f"{mm.language_stack.path}.{i}" for i in range(len(mm.language_stack.layers))]


def vision_layers(model) -> list[str]:
    (stack,) = find_multimodal(model).vision_stacks
    return [f"{stack.path}.{i}" for i in range(len(stack.layers))]


def train_steps(model, opt, kind: str, steps: int, first: int = 0):
    """`steps` optimizer steps; returns, per step, (active blocks, parameters that changed)."""
    out = []
    for step in range(first, first + steps):
        blocks = opt.active_blocks
        before = snapshot(model)
        model(**batch_for(model, kind, step)).loss.backward()
        opt.step()
        opt.zero_grad()
        out.append((blocks, changed(model, before)))
    return out


# --- the partition -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_default_partition_is_the_language_layers(family):
    model = tiny_vlm(family)
    mm = find_multimodal(model)
    names = set(dict(model.named_parameters()))
    assert mm.vision and mm.projector and not set(mm.vision) & set(mm.projector)
    assert not any(n.startswith(mm.language + ".") for n in mm.vision + mm.projector)

    part = partition_model(model)
    assert part.names == language_layers(model)
    assert part.always_active == []
    frozen = set(mm.vision) | set(mm.projector)
    assert not frozen & {n for b in part.blocks for n in b.param_names}
    # The partition's layer stack is the language model's; the vision tower runs before it.
    assert part.stacks[0].path == mm.language_stack.path and frozen <= part.input_side

    assert partition_model(model, PartitionConfig(include_projector=True)).always_active == mm.projector
    with_vision = partition_model(model, PartitionConfig(include_vision=True))
    assert with_vision.names == language_layers(model) + [v for v in vision_layers(model) if v not in mm.unused_layers]
    # The embedding / head blocks and LISA's always-active set never take the vision tower or projector.
    extra = partition_model(model, PartitionConfig(include_embedding=True, include_lm_head=True))
    assert not frozen & set(extra.blocks[0].param_names + extra.blocks[-1].param_names)
    assert extra.blocks[0].param_names == [f"{mm.language}.embed_tokens.weight"]
    lisa = partition_for(model, BAdamConfig(mode="lisa"))
    assert not frozen & set(lisa.always_active)
    assert f"{mm.language}.norm.weight" in lisa.always_active
    assert set(lisa.always_active) == names - frozen - {n for b in lisa.blocks for n in b.param_names}


def test_llava_unused_last_clip_layer_is_left_out():
    model = tiny_vlm("llava")  # vision_feature_layer=-2: the 3rd (last) CLIP layer's output is never read
    part = partition_model(model, PartitionConfig(include_vision=True))
    assert part.multimodal.unused_layers == ["model.vision_tower.encoder.layers.2"]
    assert part.names[3:] == ["model.vision_tower.encoder.layers.0", "model.vision_tower.encoder.layers.1"]
    # Check the claim: with everything trainable, that layer gets no gradient from an image batch.
    model(**vlm_batch(model)).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if n.startswith("model.vision_tower.encoder.layers.2."))
    assert all(g is not None for n, g in grads.items() if n.startswith("model.vision_tower.encoder.layers.1."))

    last = tiny_vlm("llava", vision_feature_layer=-1)
    assert partition_model(last, PartitionConfig(include_vision=True)).names[-1] == "model.vision_tower.encoder.layers.2"
    first = tiny_vlm("llava", vision_feature_layer=[1])  # a list: the highest layer read counts
    assert partition_model(first, PartitionConfig(include_vision=True)).names[3:] == [
        "model.vision_tower.encoder.layers.0"]


def test_vision_keys_on_a_text_model_are_refused(tiny_llama):
    for key in ("include_vision", "include_projector"):
        with pytest.raises(BAdamConfigError, match=f"{key}=true but LlamaForCausalLM is not a vision-language"):
            BlockOptimizer(tiny_llama(), **{key: True})
    with pytest.raises(BAdamConfigError, match="include_vision must be true or false"):
        PartitionConfig(include_vision="yes")
    with pytest.raises(BAdamConfigError, match="include_vision does not combine with target_modules"):
        PartitionConfig(include_vision=True, target_modules=["a"])
    assert BAdamConfig.from_optim_args("include_vision=true,include_projector=1").partition.include_projector


# --- training: only the scheduled blocks change ----------------------------------------------------------------


@pytest.mark.parametrize("kind", BATCHES)
@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_two_block_epochs_change_only_the_scheduled_language_layers(family, kind, caplog):
    model = tiny_vlm(family)
    start = snapshot(model)
    K = 2
    opt = BlockOptimizer(model, switch_every=K, lr=1e-2)
    D = opt.num_blocks
    with caplog.at_level(logging.WARNING, logger=LOG):
        steps = train_steps(model, opt, kind, 2 * D * K)
    for blocks, moved in steps:
        assert moved and moved <= block_params(opt, blocks)
    assert {b for blocks, _ in steps for b in blocks} == set(range(D))
    lm = find_multimodal(model).language_stack.path
    assert {n for n in changed(model, start) if not n.startswith(lm + ".")} == set()  # vision, projector, ...
    assert opt.truncation.gradless_forwards == 0 and not caplog.records


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vision_blocks_and_projector_train_and_text_batches_are_no_op_steps(family, caplog):
    """include_vision + include_projector, K=2, each block gets an image batch and then a text-only batch."""
    model = tiny_vlm(family)
    start = snapshot(model)
    opt = BlockOptimizer(model, switch_every=2, switch_mode="ascending", include_vision=True,
                         include_projector=True, lr=1e-2)
    D, projector = opt.num_blocks, set(opt.partition.always_active)
    vision = {i for i, name in enumerate(opt.partition.names) if name in vision_layers(model)}
    assert len(vision) >= 2 and projector == set(find_multimodal(model).projector)
    with caplog.at_level(logging.WARNING, logger=LOG):
        steps = train_steps(model, opt, "mixed", 2 * D * 2)  # image on even steps, text on odd ones
    for step, (blocks, moved) in enumerate(steps):
        (b,) = blocks
        assert moved <= block_params(opt, blocks) | projector
        if step % 2 == 0:  # image batch: the block and the projector train
            assert moved & block_params(opt, blocks) and moved & projector, (step, b)
        elif b in vision:  # text only, vision block active: nothing at all reaches the loss
            assert moved == set(), (step, b)
        else:  # text only, language block: the projector did not run, so it gets no gradient
            assert moved and not moved & projector, (step, b)
    # Each gradless step was logged (once per activation of a vision block) and still counted.
    assert opt.truncation.gradless_forwards == 2 * len(vision)
    assert len(caplog.records) == 2 * len(vision) and "still counts towards switch_every" in caplog.text
    assert opt.global_step == 2 * D * 2 and [s[0][0] for s in steps[::2]] == list(range(D)) * 2
    # Outside the blocks and the projector nothing moved: patch embedding, embeddings, head.
    in_blocks = block_params(opt, range(D)) | projector
    assert {n for n in changed(model, start) if n not in in_blocks} == set()


def test_an_active_block_that_never_runs_is_a_no_op_step(caplog):
    """Named explicitly, Llava's unused last CLIP layer is a block; its steps change nothing, are logged, and
    count towards K, also with images in the batch."""
    model = tiny_vlm("llava")
    start = snapshot(model)
    opt = BlockOptimizer(model, target_modules=["model.vision_tower.encoder.layers.2", "model.language_model.layers.0"],
                         switch_every=2, switch_mode="ascending", lr=1e-2)
    with caplog.at_level(logging.WARNING, logger=LOG):
        steps = train_steps(model, opt, "image", 4)
    assert [moved for _, moved in steps[:2]] == [set(), set()]
    assert all(moved for _, moved in steps[2:]) and opt.global_step == 4 and opt.active_block == 0
    assert opt.truncation.gradless_forwards == 2 and len(caplog.records) == 1
    assert "model.vision_tower.encoder.layers.2" in caplog.text
    assert not any(n.startswith("model.vision_tower") for n in changed(model, start))


# --- backward truncation -------------------------------------------------------------------------------------------


class Recorder:
    """Whether each layer's output joined an autograd graph in the last forward, per stack."""

    def __init__(self, model):
        mm = find_multimodal(model)
        self.recorded = {}
        for stack in (mm.language_stack, *mm.vision_stacks):
            for i, layer in enumerate(stack.layers):
                layer.register_forward_hook(self._hook(f"{stack.path}.{i}"))

    def _hook(self, name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self.recorded[name] = bool(out.requires_grad)
        return hook


@pytest.mark.parametrize("checkpointing", [None, "reentrant"])
@pytest.mark.parametrize("active", ["language", "vision"])
@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_gradient_equals_full_backward_and_cut_stops_at_the_lowest_active_layer(family, active, checkpointing):
    model = tiny_vlm(family)
    batch = vlm_batch(model)
    ref = copy.deepcopy(model)
    ref(**batch).loss.backward()
    if checkpointing:
        enable_activation_checkpointing(model, use_reentrant=True)
    lang, vis = language_layers(model), vision_layers(model)
    start = {"language": 1, "vision": len(lang) + 1}[active]
    opt = BlockOptimizer(model, include_vision=True, switch_every=5, switch_mode="ascending", start_block=start)
    rec = Recorder(model)
    model(**batch).loss.backward()

    mm = find_multimodal(model)
    cuts = opt.truncation.cuts
    if active == "language":  # cut at language layer 1: nothing below it, and no vision layer, is recorded
        assert cuts == {mm.vision_stacks[0].path: None, mm.language_stack.path: 1} and opt.truncation.cut_layer == 1
        assert [rec.recorded[n] for n in lang] == [False, True, True]
        assert not any(rec.recorded[n] for n in vis)
    else:  # vision layer 1: cut there; the language model's backward must run all the way down
        assert cuts == {mm.vision_stacks[0].path: 1, mm.language_stack.path: None}
        assert [rec.recorded[n] for n in vis[:2]] == [False, True]
        assert all(rec.recorded[n] for n in lang)
    refs = dict(ref.named_parameters())
    trainable = set(opt.trainable_names)
    for n, p in model.named_parameters():
        if n in trainable:
            torch.testing.assert_close(p.grad, refs[n].grad, atol=1e-6, rtol=1e-5, msg=n)
        else:
            assert p.grad is None, n


# --- exact resume ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_resume_mid_block_is_exact(family):
    cfg = dict(switch_every=3, include_vision=True, include_projector=True, lr=1e-2, seed=5)
    model = tiny_vlm(family)
    opt = BlockOptimizer(model, **cfg)
    train_steps(model, opt, "mixed", 4)
    assert opt.steps_in_block == 1  # mid-block
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train_steps(model, opt, "mixed", 6, first=4)

    again = tiny_vlm(family, seed=1)  # other initial weights: everything must come from the checkpoint
    again.load_state_dict(saved_model)
    opt2 = BlockOptimizer(again, **cfg)
    opt2.load_state_dict(saved_opt)
    assert opt2.global_step == 4 and opt2.active_block == opt.schedule.block_at(4)
    train_steps(again, opt2, "mixed", 6, first=4)
    mine = dict(again.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, mine[n]), n


# --- through the Trainer ----------------------------------------------------------------------------------------------


def trainer_args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, learning_rate=1e-2,
                report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    return TrainingArguments(**(base | kw))


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_plain_trainer_with_optim_badam_trains_two_block_epochs(family, tmp_path):
    """`--optim badam` with the stock Trainer, shuffled batches mixing image and text-only rows."""
    model = tiny_vlm(family)
    start = snapshot(model)
    K, D = 2, len(language_layers(model))
    args = trainer_args(tmp_path, optim="badam", optim_args=f"switch_every={K}", max_steps=2 * D * K)
    trainer = Trainer(model=model, args=args, train_dataset=VLMDataset(model, n=24), data_collator=vlm_collate)
    trainer.train()
    assert unwrap_optimizer(trainer.optimizer).global_step == 2 * D * K
    moved = changed(model, start)
    for layer in language_layers(model):  # every language layer trained...
        assert any(n.startswith(layer + ".") for n in moved), layer
    assert moved <= {n for n in start if any(n.startswith(layer + ".") for layer in language_layers(model))}


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_badam_trainer_with_vision_blocks_and_projector(family, tmp_path):
    """BAdamTrainer, include_vision + include_projector, K=1, single-row batches in order."""
    model = tiny_vlm(family)
    start = snapshot(model)
    cfg = BAdamConfig.from_optim_args("switch_every=1,switch_mode=ascending,include_vision=true,include_projector=true")
    D = len(partition_for(model, cfg))
    args = trainer_args(tmp_path, per_device_train_batch_size=1, max_steps=2 * D, train_sampling_strategy="sequential")
    data = VLMDataset(model, n=2 * D, pattern=[True] * D + [False] * D)  # epoch 1: images; epoch 2: text only
    trainer = BAdamTrainer(model=model, args=args, train_dataset=data, data_collator=vlm_collate, badam_config=cfg)
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    assert opt.global_step == 2 * D
    trained = block_params(opt, range(D)) | set(opt.partition.always_active)
    moved = changed(model, start)
    assert moved <= trained and moved & set(opt.partition.always_active)
    # Block b trains on row b (an image) and row D + b (text only): every block moved, and the vision blocks'
    # text-only steps were no-ops.
    for b in range(D):
        assert moved & block_params(opt, [b]), opt.partition.names[b]
    n_vision = sum(name in vision_layers(model) for name in opt.partition.names)
    assert opt.truncation.gradless_forwards == n_vision


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_lisa_and_ratio_modes_keep_the_vision_tower_frozen(family):
    for mode, extra in (("lisa", dict(lisa_layers=2)), ("ratio", dict(update_ratio=0.5))):
        model = tiny_vlm(family)
        start = snapshot(model)
        opt = BlockOptimizer(model, mode=mode, switch_every=2, lr=1e-2, **extra)
        for blocks, moved in train_steps(model, opt, "mixed", 8):
            assert moved
        mm = find_multimodal(model)
        assert not changed(model, start) & (set(mm.vision) | set(mm.projector)), mode


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_bf16_no_op_step_mid_block_leaves_weights_and_masters_untouched(family):
    """bf16 weights with fp32 masters held split between steps: a text-only step between two image steps of a
    vision block changes no bit, and the next image step continues from the same masters and moments."""
    model = tiny_vlm(family).to(torch.bfloat16)
    vis = vision_layers(model)[0]
    opt = BlockOptimizer(model, target_modules=[vis], switch_every=4, lr=1e-2)
    kinds = ["image", "text", "text", "image"]
    twin = copy.deepcopy(model)
    twin_opt = BlockOptimizer(twin, target_modules=[vis], switch_every=4, lr=1e-2)
    for step, kind in enumerate(kinds):
        before = snapshot(model)
        moved = train_steps(model, opt, kind, 1, first=step)[0][1]
        assert bool(moved) == (kind == "image"), step
        if kind == "text":
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # The twin skips the text-only steps' forward altogether and steps on no gradient: same weights.
    for step, kind in enumerate(kinds):
        if kind == "image":
            twin(**batch_for(twin, kind, step)).loss.backward()
        twin_opt.step()
        twin_opt.zero_grad()
    mine = dict(twin.named_parameters())
    assert all(torch.equal(p, mine[n]) for n, p in model.named_parameters())
    assert opt.truncation.gradless_forwards == 2 and twin_opt.truncation.gradless_forwards == 0
