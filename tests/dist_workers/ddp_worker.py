"""torchrun worker: BlockOptimizer + DistributedDataParallel in a plain PyTorch loop (CPU, gloo).

Usage: PYTHONPATH=.. python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_worker.py OUT_DIR

For each scenario every rank writes its final parameters ({name}_rank{r}.pt) and per-step records
({name}_rank{r}.json: active block, trainable names, names that changed). Rank 0 then also computes the
single-process reference, which averages the two ranks' gradients by hand ({name}_ref.pt).
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_common import averaged_gradient_run, batch, error_of, finish, params_cpu, training_llama, write_json
from tiny_models import tiny_llama

from badam_hf import BlockOptimizer  # noqa: E402
from badam_hf.distributed import DistributedSetupError, attach_ddp  # noqa: E402
from badam_hf.engines.common import set_engine_sync

WORLD = 2
SCENARIOS = [
    # DDP wrapped after the optimizer froze everything but block 0; ascending order revisits block 0.
    dict(name="plain", tag=1, wrap="after", ga=1, gc=None, mode="ascending", steps=10, find_unused=False),
    # DDP wrapped over the whole (trainable) model first, gradient accumulation, non-reentrant checkpointing.
    dict(name="ga_gc", tag=2, wrap="before", ga=2, gc=False, mode="random", steps=10, find_unused=False),
    # Reentrant checkpointing (which DDP supports with find_unused_parameters=False), descending order.
    dict(name="reentrant", tag=3, wrap="after", ga=1, gc=True, mode="descending", steps=8, find_unused=False),
    # bf16 weights, GA=4 under no_sync(): fp32 accumulation of the micro-batches, one rounding, bf16 all-reduce.
    dict(name="bf16_ga", tag=5, wrap="after", ga=4, gc=None, mode="ascending", steps=10, find_unused=False,
         dtype=torch.bfloat16),
    # Mode ratio (GA=2): every matrix stays trainable, so the reducer is never rebuilt; the masks move at
    # steps 2 and 4 identically on both ranks (a pure function of seed, period and parameter).
    dict(name="ratio", tag=6, wrap="after", ga=2, gc=None, mode=None, steps=6, find_unused=False,
         opt=dict(mode="ratio", update_ratio=0.2, mask_mode="scatter")),
    # Mode lisa: two sampled layers plus the embeddings and head; the reducer follows each new sample.
    dict(name="lisa", tag=7, wrap="after", ga=1, gc=None, mode=None, steps=6, find_unused=False,
         opt=dict(mode="lisa", lisa_layers=2)),
    # Control without attach_ddp: DDP keeps reducing block 0 only, so the ranks drift apart from block 1 on.
    dict(name="control", tag=4, wrap="after", ga=1, gc=None, mode="ascending", steps=4, find_unused=True, attach=False),
]


def build(sc):
    return training_llama(sc["gc"]).to(sc.get("dtype", torch.float32))


def make_opt(model, sc, fp32_grad_accumulation=True):
    return BlockOptimizer(model, lr=0.5, inner_optimizer="sgd", switch_every=2,
                          fp32_grad_accumulation=fp32_grad_accumulation, **sc.get("opt", {"switch_mode": sc["mode"]}))


def run_ddp(sc, rank, out):
    model = build(sc)
    if sc["wrap"] == "before":
        ddp = DDP(model, find_unused_parameters=sc["find_unused"])
        opt = make_opt(model, sc)
    else:
        opt = make_opt(model, sc)
        ddp = DDP(model, find_unused_parameters=sc["find_unused"])
    if sc.get("attach", True):
        sync = attach_ddp(ddp, opt)
    else:  # negative control: what happens without the glue (the guard is bypassed on purpose)
        sync = None
        set_engine_sync(opt, "unattached control")
    records = []
    for step in range(sc["steps"]):
        before = params_cpu(model)
        record = {"block": opt.active_block, "blocks": list(opt.active_blocks), "trainable": opt.trainable_names}
        for micro in range(sc["ga"]):
            ids = batch(sc["tag"], step, micro, rank)
            ctx = ddp.no_sync() if micro < sc["ga"] - 1 else contextlib.nullcontext()
            with ctx:
                (ddp(input_ids=ids, labels=ids).loss / sc["ga"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        after = params_cpu(model)
        record["changed"] = [n for n in after if not torch.equal(after[n], before[n])]
        records.append(record)
    torch.save(params_cpu(model), os.path.join(out, f"{sc['name']}_rank{rank}.pt"))
    write_json(
        os.path.join(out, f"{sc['name']}_rank{rank}.json"),
        {
            "records": records,
            "rebuilds": sync.rebuilds if sync else 0,
            "rebuild_ms": sync.total_rebuild_ms / sync.rebuilds if sync else None,
        },
    )


def run_reference(sc, out):
    """One process, no DDP: each rank's gradients averaged by hand."""
    low_precision = sc.get("dtype", torch.float32) != torch.float32
    model = build(sc)
    opt = make_opt(model, sc, fp32_grad_accumulation=False)  # the reference accumulates by hand
    averaged_gradient_run(model, opt, sc["tag"], sc["steps"], sc["ga"],
                          accumulate=torch.float32 if low_precision else None)
    torch.save(params_cpu(model), os.path.join(out, f"{sc['name']}_ref.pt"))
    if low_precision:  # what accumulating the micro-batches in bf16 would have given
        model = build(sc)
        averaged_gradient_run(model, make_opt(model, sc, False), sc["tag"], sc["steps"], sc["ga"])
        torch.save(params_cpu(model), os.path.join(out, f"{sc['name']}_bf16ref.pt"))


def run_guard(rank, out):
    """More than one process and no attached DDP wrapper: the first step must refuse."""
    result = {}
    for case in ("no_ddp", "unattached_ddp"):
        model = tiny_llama()
        opt = BlockOptimizer(model, lr=0.5, inner_optimizer="sgd", switch_every=2)
        fwd = DDP(model) if case == "unattached_ddp" else model
        ids = batch(9, 0, 0, rank)
        fwd(input_ids=ids, labels=ids).loss.backward()
        before = params_cpu(model)
        result[case] = error_of(opt.step, DistributedSetupError)
        after = params_cpu(model)
        result[case + "_unchanged"] = all(torch.equal(before[n], after[n]) for n in before)
    # Ranks configured differently (start_block differs): attach_ddp notices before any step.
    model = tiny_llama()
    opt = BlockOptimizer(model, lr=0.5, inner_optimizer="sgd", switch_every=2, start_block=rank)
    result["mismatch"] = error_of(lambda: attach_ddp(DDP(model), opt), DistributedSetupError)
    # BREAD's in-backward step cannot be all-reduced: refused when DDP is attached, before any step.
    model = tiny_llama()
    opt = BlockOptimizer(model, lr=0.5, inner_optimizer="sgd", switch_every=2, inactive_update="sgd")
    result["bread"] = error_of(lambda: attach_ddp(DDP(model), opt), DistributedSetupError)
    write_json(os.path.join(out, f"guard_rank{rank}.json"), result)


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == WORLD
    for sc in SCENARIOS:
        run_ddp(sc, rank, out)
    run_guard(rank, out)
    dist.barrier()
    if rank == 0:
        for sc in SCENARIOS:
            if sc.get("attach", True):
                run_reference(sc, out)
    finish()


if __name__ == "__main__":
    main()
