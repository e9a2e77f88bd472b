"""torch.compile without a recompile per block: the stack layers are compiled one by one (regional
compilation), so the number of compiled variants stays a small constant whatever D is, nothing falls back to
eager, and the trajectory equals eager training. Whole-model compilation, the negative control, recompiles at
every switch. Dynamo's "eager" backend keeps the tests fast; the guards, hence the recompiles, are the same
with inductor."""

from __future__ import annotations

import functools

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from badam_hf import BAdamConfig, BAdamTrainer, BlockOptimizer
from badam_hf.core.compilation import compile_layers, is_layer_compiled
import tiny_models



batch = functools.partial(tiny_models.batch, offset=4000)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    # A recompile beyond this would be a silent fall-back to eager: make it an error instead.
    with torch._dynamo.config.patch(recompile_limit=6, fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()
    counters.clear()


def train(model, opt, steps: int) -> None:
    for t in range(steps):
        ids = batch(t)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_a_kv_cache_while_training_is_warned_about(tiny_llama):
    model = tiny_llama(layers=2)  # use_cache=True: transformers builds a cache whose per-layer state splits graphs
    opt = BlockOptimizer(model, lr=1e-2, switch_every=1)
    with pytest.warns(UserWarning, match="use_cache"):
        compile_layers(model, opt.partition, backend="eager")


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_layers_have_a_constant_number_of_variants_and_train_like_eager(fresh_dynamo, tiny_llama, dtype):
    seen = {}
    for D in (2, 5):
        torch._dynamo.reset()
        counters.clear()
        model = tiny_llama(layers=D, dtype=dtype, use_cache=False)
        opt = BlockOptimizer(model, lr=1e-2, switch_every=1, switch_mode="ascending")
        assert len(compile_layers(model, opt.partition, backend="eager")) == D
        assert compile_layers(model, opt.partition, backend="eager") == []  # once
        train(model, opt, 2 * D)  # two block-epochs: every layer active twice
        seen[D] = graphs()
        eager = tiny_llama(layers=D, dtype=dtype, use_cache=False)
        eager_opt = BlockOptimizer(eager, lr=1e-2, switch_every=1, switch_mode="ascending")
        train(eager, eager_opt, 2 * D)
        for (n, p), q in zip(model.named_parameters(), eager.parameters()):
            assert torch.equal(p, q), n
    # below / at / above the active layer (and the first step's variants): the same count for D=2 and D=5
    assert seen[2] == seen[5] <= 4, seen


@torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=False)
def test_whole_model_compile_recompiles_at_every_switch(fresh_dynamo, tiny_llama):
    """The negative control: what the layer-wise compile avoids."""
    model = tiny_llama(layers=4, use_cache=False)
    opt = BlockOptimizer(model, lr=1e-2, switch_every=1, switch_mode="ascending")
    compiled = torch.compile(model, backend="eager")
    for t in range(4):
        ids = batch(t)
        compiled(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert graphs() >= 4  # at least one new graph per block


def test_trainer_torch_compile_compiles_layer_by_layer(fresh_dynamo, tiny_llama, tmp_path):
    from transformers import TrainingArguments

    model = tiny_llama(layers=4, use_cache=False)
    data = [{"input_ids": batch(i)[0], "labels": batch(i)[0]} for i in range(16)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to="none", use_cpu=True, save_strategy="no", logging_steps=4, disable_tqdm=True, seed=0,
        torch_compile=True, torch_compile_backend="eager",
    )
    trainer = BAdamTrainer(model=model, args=args, train_dataset=data,
                           badam_config=BAdamConfig.from_flat(dict(switch_every=1, switch_mode="ascending")))
    trainer.train()
    assert all(is_layer_compiled(layer) for layer in model.model.layers)
    assert not isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)  # not the whole model
    assert 0 < graphs() <= 4  # two block-epochs, a constant number of variants
