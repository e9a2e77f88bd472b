"""torchrun worker: BlockOptimizer under DeepSpeed ZeRO-3 in a plain loop (CPU, gloo, DS_ACCELERATOR=cpu).

Usage: DS_ACCELERATOR=cpu PYTHONPATH=.. python -m torch.distributed.run --standalone --nproc_per_node 2 \
           deepspeed_worker.py OUT

For each scenario every rank writes its final full parameters, gathered from the ZeRO-3 shards
({name}_rank{r}.pt), and per-step records ({name}_rank{r}.json: active block, trainable names, names that
changed, step count, DeepSpeed's trainable set and number of sub-groups). Rank 0 also computes the
single-process reference without DeepSpeed, which averages the two ranks' gradients by hand ({name}_ref.pt).
Then refusals (unattached engine, ZeRO-1/2, an "optimizer" block, offload) are recorded in errors_rank{r}.json.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from dist_common import averaged_gradient_run, batch, finish, params_cpu, training_llama, write_json
from tiny_models import tiny_llama

import deepspeed  # noqa: E402

from badam_hf import BlockOptimizer  # noqa: E402
from badam_hf.deepspeed_zero3 import attach_deepspeed  # noqa: E402
from badam_hf.distributed import DistributedSetupError  # noqa: E402
from badam_hf.engines.common import set_engine_sync

WORLD = 2
LR = 0.5
SCENARIOS = [
    # Several sub-groups per step (small sub_group_size): DeepSpeed calls the client step() once per
    # sub-group; the ascending order revisits block 0.
    dict(name="plain", tag=1, ga=1, gc=None, mode="ascending", steps=10, sub_group_size=1000),
    # Gradient accumulation and non-reentrant gradient checkpointing, random order.
    dict(name="ga_gc", tag=2, ga=2, gc=False, mode="random", steps=8, sub_group_size=10**9),
    # Reentrant checkpointing, descending order.
    dict(name="reentrant", tag=3, ga=1, gc=True, mode="descending", steps=8, sub_group_size=10**9),
    # Optimizer offload to the CPU (the client optimizer runs the offloaded step); AdamW with weight decay
    # on attention / MLP blocks: an attention block has no no-decay parameter, so DeepSpeed drops that
    # (empty) param group at initialize and the glue must restore it.
    dict(name="offload", tag=4, ga=1, gc=None, mode="ascending", steps=6, sub_group_size=10**9,
         extra={"zero_force_ds_cpu_optimizer": False}, zero={"offload_optimizer": {"device": "cpu"}},
         opt=dict(inner_optimizer="adamw", lr=1e-2, weight_decay=0.1, granularity="attn_mlp")),
]


def ds_config(ga=1, stage=3, sub_group_size=10**9, zero=None, **extra):
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": ga,
        "gradient_clipping": 0.0,  # DeepSpeed would clip at 1.0 by default; the reference does not clip
        "zero_optimization": {
            "stage": stage,
            "stage3_param_persistence_threshold": 0,  # partition even the tiny model's parameters
            "sub_group_size": sub_group_size,
            "memory_efficient_linear": False,  # keep torch's own linear backward, as the reference does
        },
        "zero_allow_untested_optimizer": True,  # a client optimizer (the Trainer sets this itself)
        "steps_per_print": 10**9,
    }
    cfg["zero_optimization"].update(zero or {})
    cfg.update(extra)
    return cfg


def build(sc):
    return training_llama(sc["gc"])


def make_opt(model, sc):
    kwargs = dict(lr=LR, inner_optimizer="sgd") | sc.get("opt", {})
    return BlockOptimizer(model, switch_every=2, switch_mode=sc["mode"], **kwargs)


def gathered(model) -> dict[str, torch.Tensor]:
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return params_cpu(model)


def run_ds(sc, rank, out):
    model = build(sc)
    opt = make_opt(model, sc)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=opt,
        config=ds_config(sc["ga"], sub_group_size=sc["sub_group_size"], zero=sc.get("zero"), **sc.get("extra", {})),
    )
    sync = attach_deepspeed(engine, opt)
    zero = engine.optimizer
    calls = {"n": 0}
    opt.register_step_post_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    records = []
    for step in range(sc["steps"]):
        before = gathered(model)
        names = {id(p): n for n, p in model.named_parameters()}
        record = {
            "block": opt.active_block,
            "trainable": opt.trainable_names,
            "ds_trainable": sorted(names[id(p)] for g in zero.fp16_groups for p in g),
            "sub_groups": len(zero.fp16_groups),
            "masters": len(opt.masters),
            "groups": len(opt.param_groups),
        }
        calls["n"] = 0
        for micro in range(sc["ga"]):
            ids = batch(sc["tag"], step, micro, rank)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        after = gathered(model)
        record["changed"] = [n for n in after if not torch.equal(after[n], before[n])]
        record["global_step"] = opt.global_step
        record["client_calls"] = calls["n"]
        records.append(record)
    torch.save(gathered(model), os.path.join(out, f"{sc['name']}_rank{rank}.pt"))
    write_json(
        os.path.join(out, f"{sc['name']}_rank{rank}.json"),
        {"records": records, "rebuilds": sync.rebuilds, "rebuild_ms": sync.total_rebuild_ms / sync.rebuilds},
    )
    engine.destroy()


def run_reference(sc, out):
    """One process, no DeepSpeed: each rank's gradients averaged by hand."""
    model = build(sc)
    averaged_gradient_run(model, make_opt(model, sc), sc["tag"], sc["steps"], sc["ga"])
    torch.save(params_cpu(model), os.path.join(out, f"{sc['name']}_ref.pt"))


def run_bf16(rank, out):
    """bf16 weights: DeepSpeed keeps the fp32 masters (BlockOptimizer keeps none); AdamW inner optimizer."""
    model = tiny_llama(dtype=torch.bfloat16)
    opt = BlockOptimizer(model, lr=1e-2, switch_every=2, switch_mode="ascending")
    masters_before = len(opt.masters)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(bf16={"enabled": True}))
    attach_deepspeed(engine, opt)
    initial = gathered(model)
    fp32_dtypes = set()
    state_on_flats = []
    for step in range(8):
        ids = batch(5, step, 0, rank)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        fp32_dtypes |= {str(t.dtype) for t in engine.optimizer.fp32_partitioned_groups_flat}
        engine.step()
        if step % 2 == 0:  # mid-block: AdamW state exists, keyed by DeepSpeed's fp32 partitions only
            flats = {id(t) for t in engine.optimizer.fp32_partitioned_groups_flat}
            state_on_flats.append(len(opt.inner.state) > 0 and all(id(k) in flats for k in opt.inner.state))
    final = gathered(model)
    torch.save(final, os.path.join(out, f"bf16_rank{rank}.pt"))
    write_json(
        os.path.join(out, f"bf16_rank{rank}.json"),
        {
            "changed": [n for n in final if not torch.equal(final[n], initial[n])],
            "dtypes": sorted({str(t.dtype) for t in final.values()}),
            "masters_before_attach": masters_before,
            "masters_after": len(opt.masters),
            "ds_master_dtypes": sorted(fp32_dtypes),
            "state_on_flats": state_on_flats,
            "inner_state_after_switch": len(opt.inner.state),
            "global_step": opt.global_step,
        },
    )
    engine.destroy()


def attempt(fn) -> str | None:
    try:
        fn()
    except DistributedSetupError as e:
        return str(e)
    return None


def run_errors(rank, out):
    result = {}

    for case in ("unattached", "unattached_single"):

        def unattached(case=case):
            model = tiny_llama()
            opt = BlockOptimizer(model, lr=LR, inner_optimizer="sgd", switch_every=2)
            if case == "unattached_single":  # what one process sees: no multi-process first-step guard
                set_engine_sync(opt, "guard bypassed")
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config())
            ids = batch(7, 0, 0, rank)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            try:
                engine.step()
            finally:
                result[case + "_steps"] = opt.global_step

        result[case] = attempt(unattached)

    def with_config(**kwargs):
        model = tiny_llama()
        opt = BlockOptimizer(model, lr=LR, inner_optimizer="sgd", switch_every=2)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(**kwargs))
        attach_deepspeed(engine, opt)

    result["optimizer_block"] = attempt(
        lambda: with_config(optimizer={"type": "AdamW", "params": {"lr": 1e-3}})
    )
    result["offload_param"] = attempt(lambda: with_config(zero={"offload_param": {"device": "cpu"}}))

    def always_active():
        model = tiny_llama()
        opt = BlockOptimizer(model, lr=LR, inner_optimizer="sgd", switch_every=2, always_active=["model.norm"])
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config())
        attach_deepspeed(engine, opt)

    result["always_active"] = attempt(always_active)

    for stage in (1, 2):

        def zero12(stage=stage):
            model = tiny_llama()
            opt = BlockOptimizer(model, lr=LR, inner_optimizer="sgd", switch_every=2)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage=stage))
            attach_deepspeed(engine, opt)

        result[f"stage{stage}"] = attempt(zero12)

    def mismatch():
        model = tiny_llama()
        opt = BlockOptimizer(model, lr=LR, inner_optimizer="sgd", switch_every=2, start_block=rank)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config())
        attach_deepspeed(engine, opt)

    result["mismatch"] = attempt(mismatch)
    write_json(os.path.join(out, f"errors_rank{rank}.json"), result)


def main():
    out = sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == WORLD
    only = os.environ.get("BADAM_DS_SCENARIOS")
    for sc in SCENARIOS:
        if not only or sc["name"] in only.split(","):
            run_ds(sc, rank, out)
    if not only or "bf16" in only.split(","):
        run_bf16(rank, out)
    if not only or "errors" in only.split(","):
        run_errors(rank, out)
    dist.barrier()
    if rank == 0:
        for sc in SCENARIOS:
            if not only or sc["name"] in only.split(","):
                run_reference(sc, out)
    finish()


if __name__ == "__main__":
    main()
