"""torchrun worker: BlockOptimizer on an FSDP2 (`fully_shard`) model in a plain loop (CPU, gloo).

Usage: PYTHONPATH=.. python -m torch.distributed.run --standalone --nproc_per_node 2 fsdp_worker.py OUT_DIR

Each scenario writes the gathered final parameters ({name}.pt, rank 0), per-step records ({name}.json:
active block, names that changed, bytes of optimizer-side state on this rank) and, on rank 0 after the
distributed part, a single-process reference that averages the two ranks' gradients by hand
({name}_ref.pt).
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from dist_common import averaged_gradient_run, batch, error_of, finish, training_llama, write_json
from tiny_models import tiny_llama

from badam_hf import BlockOptimizer  # noqa: E402
from badam_hf.fsdp import attach_fsdp2  # noqa: E402
from badam_hf.engines.common import set_engine_sync

WORLD = 2
SCENARIOS = [
    # bf16 weights, fp32 gradient reduction (the mixed-precision case that needs the dtype refresh);
    # ascending order revisits block 0.
    dict(name="bf16", tag=11, dtype="bf16", reduce="fp32", ga=1, gc=None, mode="ascending", steps=10),
    # Gradient accumulation (no reduce-scatter on the first micro-batch) with non-reentrant checkpointing.
    dict(name="ga_gc", tag=12, dtype="bf16", reduce="fp32", ga=2, gc=False, mode="random", steps=8),
    # fp32 weights, no mixed precision: local fp32 masters for the DTensor shards.
    dict(name="fp32", tag=13, dtype="fp32", reduce=None, ga=1, gc=None, mode="descending", steps=8),
    # Mode ratio on shards: masks drawn over the whole tensor and cut to each rank's rows, GA=2.
    dict(name="ratio", tag=17, dtype="bf16", reduce="fp32", ga=2, gc=None, mode=None, steps=6,
         opt=dict(mode="ratio", update_ratio=0.2, mask_mode="scatter")),
    # Mode lisa on shards: two sampled layers plus the (sharded) embeddings, final norm and head.
    dict(name="lisa", tag=18, dtype="bf16", reduce="fp32", ga=1, gc=None, mode=None, steps=6,
         opt=dict(mode="lisa", lisa_layers=2)),
]
RESUME = dict(name="resume", tag=14, dtype="bf16", reduce="fp32", ga=1, gc=None, mode="random", steps=9, cut=5)
# fp32 sharded weights computed in bf16 (accelerate's FSDP2 mixed precision): a group frozen at the first
# forward has no dtypes until the refresh. With attach_fsdp2 it trains; without it (control) it fails.
UPCAST = dict(name="upcast", tag=15, dtype="fp32", param="bf16", reduce="fp32", ga=1, gc=None, mode="ascending",
              steps=6)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build(sc, shard: bool):
    model = training_llama(sc["gc"]).to(DTYPES[sc["dtype"]])
    if shard:
        mp = MixedPrecisionPolicy(
            param_dtype=DTYPES[sc["param"]] if sc.get("param") else None,
            reduce_dtype=DTYPES[sc["reduce"]] if sc["reduce"] else None,
        )
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model


def make_opt(model, sc, lr=0.5, inner="sgd"):
    return BlockOptimizer(model, lr=lr, inner_optimizer=inner, switch_every=2, seed=3,
                          **sc.get("opt", {"switch_mode": sc["mode"]}))


def full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter gathered to a full CPU tensor (collective: all ranks call it)."""
    from torch.distributed.tensor import DTensor

    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().to("cpu", copy=True)
        for n, p in model.named_parameters()
    }


def train_steps(model, opt, sc, rank, steps, records=None):
    # State bytes as the inner optimizer finishes (masters exist from a block's first step to its switch).
    held = {}
    handle = opt.inner.register_step_post_hook(
        lambda *a: held.update(bytes=opt.memory_bytes()["masters"] + opt.memory_bytes()["optimizer_state"]))
    for step in steps:
        before = full_params(model) if records is not None else None
        block, blocks = opt.active_block, opt.active_blocks
        for micro in range(sc["ga"]):
            last = micro == sc["ga"] - 1
            model.set_requires_gradient_sync(last)  # accumulate locally, reduce-scatter once per step
            ids = batch(sc["tag"], step, micro, rank)
            (model(input_ids=ids, labels=ids).loss / sc["ga"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if records is not None:
            after = full_params(model)
            records.append({
                "block": block,
                "blocks": list(blocks),
                "changed": [n for n in after if not torch.equal(after[n], before[n])],
                "state_bytes": held["bytes"],
            })
    handle.remove()


def run_fsdp(sc, rank, out):
    model = build(sc, shard=True)
    opt = make_opt(model, sc)
    sync = attach_fsdp2(model, opt)
    records = []
    train_steps(model, opt, sc, rank, range(sc["steps"]), records)
    final = full_params(model)
    if rank == 0:
        torch.save(final, os.path.join(out, f"{sc['name']}.pt"))
    write_json(os.path.join(out, f"{sc['name']}_rank{rank}.json"), {"records": records, "refreshes": sync.refreshes})


def run_reference(sc, out):
    """One process, no FSDP: each rank's gradients averaged by hand in the reduce dtype, then stored in the
    weights' dtype, as FSDP2 does."""
    model = build(sc, shard=False)
    reduce = DTYPES[sc["reduce"]] if sc["reduce"] else None
    averaged_gradient_run(model, make_opt(model, sc), sc["tag"], sc["steps"], sc["ga"], reduce=reduce)
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, os.path.join(out, f"{sc['name']}_ref.pt"))


def run_resume(rank, out):
    """Sharded checkpoint mid-block: model through torch.distributed.checkpoint, optimizer one file per rank;
    a fresh sharded model + optimizer resumes and must end bit-identical to the uninterrupted run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    sc = RESUME
    ckpt = os.path.join(out, "resume_ckpt")
    model = build(sc, shard=True)
    opt = make_opt(model, sc, lr=1e-2, inner="adamw")
    attach_fsdp2(model, opt)
    train_steps(model, opt, sc, rank, range(sc["cut"]))
    dcp.save(get_model_state_dict(model), checkpoint_id=ckpt)
    torch.save(opt.state_dict(), os.path.join(ckpt, f"badam_optimizer.rank{rank}.pt"))
    saved_block, saved_in_block = opt.active_block, opt.steps_in_block
    train_steps(model, opt, sc, rank, range(sc["cut"], sc["steps"]))
    straight = full_params(model)

    model2 = build(sc, shard=True)
    opt2 = make_opt(model2, sc, lr=1e-2, inner="adamw")
    attach_fsdp2(model2, opt2)
    state = get_model_state_dict(model2)
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model2, state)
    opt2.load_state_dict(torch.load(os.path.join(ckpt, f"badam_optimizer.rank{rank}.pt"), weights_only=True))
    resumed_block = opt2.active_block
    train_steps(model2, opt2, sc, rank, range(sc["cut"], sc["steps"]))
    resumed = full_params(model2)

    # A checkpoint written by 2 ranks cannot be loaded into a different sharding: refused by name.
    sd = torch.load(os.path.join(ckpt, f"badam_optimizer.rank{rank}.pt"), weights_only=True)
    sd["badam"]["shards"] = 4
    wrong_world = error_of(lambda: opt2.load_state_dict(sd), ValueError)
    if rank == 0:
        torch.save({"straight": straight, "resumed": resumed}, os.path.join(out, "resume.pt"))
    write_json(os.path.join(out, f"resume_rank{rank}.json"), {
        "saved_block": saved_block, "saved_in_block": saved_in_block, "resumed_block": resumed_block,
        "wrong_world": wrong_world,
    })


def run_control(rank, out):
    """Without attach_fsdp2 (guard bypassed on purpose), the first switch to a block that was frozen at the
    first forward breaks the backward: this is what the dtype refresh exists for."""
    sc = UPCAST
    model = build(sc, shard=True)
    opt = make_opt(model, sc)
    set_engine_sync(opt, "unattached control")
    error = error_of(lambda: train_steps(model, opt, sc, rank, range(sc["steps"])))
    write_json(os.path.join(out, f"control_rank{rank}.json"), {"error": error})


def run_misuse(rank, out):
    """An optimizer built before fully_shard picks up the new DTensor parameters when attached; a sharded
    model that is never attached is refused at the first step."""
    from badam_hf.distributed import DistributedSetupError

    result = {}
    model = tiny_llama(dtype=torch.bfloat16)
    opt = BlockOptimizer(model, lr=0.5, inner_optimizer="sgd", switch_every=2, switch_mode="ascending")
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    attach_fsdp2(model, opt)
    before = full_params(model)
    ids = batch(16, 0, 0, rank)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    after = full_params(model)
    result["built_before_shard_changed"] = [n for n in after if not torch.equal(after[n], before[n])]
    result["master_rows"] = [int(m.shape[0]) for m in opt.masters.values()]
    model = build(RESUME, shard=True)
    opt = BlockOptimizer(model, lr=0.5, inner_optimizer="sgd", switch_every=2)
    model(input_ids=ids, labels=ids).loss.backward()
    result["unattached"] = error_of(opt.step, DistributedSetupError)
    write_json(os.path.join(out, f"misuse_rank{rank}.json"), result)


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == WORLD
    for sc in SCENARIOS:
        run_fsdp(sc, rank, out)
    run_fsdp(UPCAST, rank, out)
    run_resume(rank, out)
    run_control(rank, out)
    run_misuse(rank, out)
    dist.barrier()
    if rank == 0:
        for sc in SCENARIOS:
            run_reference(sc, out)
    finish()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
