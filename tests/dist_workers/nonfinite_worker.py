"""torchrun worker: a non-finite gradient on one rank only (CPU, gloo, DDP, plain loop).

Usage: PYTHONPATH=.. python -m torch.distributed.run --standalone --nproc_per_node 2 nonfinite_worker.py OUT_DIR

After the DDP all-reduce of step 3 (block 1's first step: not a block's last, whose skip still writes the
masters back with switch_rounding), rank 0 alone writes a NaN into one gradient entry (as a fault after the
reduction would). With the DDP sync's flag reduce both ranks skip that step; in the control (the flag reduce
removed) rank 1 steps alone. Every rank writes its final parameters and its counts per scenario.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_common import batch, finish, params_cpu, training_llama, write_json

from badam_hf import BlockOptimizer  # noqa: E402
from badam_hf.distributed import attach_ddp  # noqa: E402

SCENARIOS = [
    dict(name="agree", dtype=torch.float32, reduce=True),
    dict(name="agree_bf16", dtype=torch.bfloat16, reduce=True),
    dict(name="control", dtype=torch.float32, reduce=False),
]


def run(sc, rank, out):
    model = training_llama().to(sc["dtype"])
    opt = BlockOptimizer(model, lr=1e-2, switch_every=2, switch_mode="ascending")
    ddp = DDP(model)
    attach_ddp(ddp, opt)
    if not sc["reduce"]:
        opt._flag_reducers.clear()
    unchanged = None
    for step in range(4):
        ids = batch(11, step, 0, rank)
        ddp(input_ids=ids, labels=ids).loss.backward()
        if step == 2 and rank == 0:
            holder = next(h for h in opt.gradient_holders(model.parameters()) if h.grad is not None)
            holder.grad.view(-1)[0] = float("nan")
        before = params_cpu(model)
        opt.step()
        opt.zero_grad()
        if step == 2:
            after = params_cpu(model)
            unchanged = all(torch.equal(before[n], after[n]) for n in before)
    torch.save(params_cpu(model), os.path.join(out, f"{sc['name']}_rank{rank}.pt"))
    write_json(os.path.join(out, f"{sc['name']}_rank{rank}.json"),
               {"skipped": opt.skipped_steps, "step": opt.global_step, "block": opt.active_block,
                "skipped_step_unchanged": unchanged})


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for sc in SCENARIOS:
        run(sc, rank, out)
    finish()


if __name__ == "__main__":
    main()
