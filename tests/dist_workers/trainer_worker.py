"""torchrun worker: Hugging Face Trainer with BAdam under 2-process DDP on CPU (gloo).

Usage: PYTHONPATH=.. python -m torch.distributed.run --standalone --nproc_per_node 2 trainer_worker.py OUT_DIR

Runs (1) a plain `Trainer` with `optim="badam"` and (2) a `BAdamTrainer` with gradient accumulation and
gradient checkpointing. Each rank writes its initial and final parameters and the blocks it trained.
"""

from __future__ import annotations

import os
import sys

import torch

from dist_common import CPU_TRAINER_ARGS, Tokens, finish, params_cpu, write_json
from tiny_models import tiny_llama

from transformers import Trainer, TrainingArguments, TrainerCallback  # noqa: E402

from badam_hf import BAdamTrainer  # noqa: E402  (importing badam_hf registers --optim badam)
from badam_hf.core.optimizer import unwrap_optimizer  # noqa: E402
from badam_hf.core.hf_features import checkpointing_field  # noqa: E402
from badam_hf.engines.common import engine_sync


class BlockLog(TrainerCallback):
    """Records the block that takes each optimizer step."""

    def __init__(self):
        self.blocks = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.blocks.append(unwrap_optimizer(optimizer).active_block)


RUNS = [
    dict(name="trainer_optim", cls="Trainer", ga=1, gc=False, steps=8,
         optim_args="switch_every=2,switch_mode=ascending,inner_optimizer=sgd", lr=0.5),
    dict(name="badam_trainer_ga_gc", cls="BAdamTrainer", ga=2, gc=True, steps=6,
         optim_args="switch_every=2,switch_mode=random", lr=1e-2),
]


def main():
    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    for run in RUNS:
        model = tiny_llama()
        initial = params_cpu(model)
        args = TrainingArguments(
            **CPU_TRAINER_ARGS,
            output_dir=os.path.join(out, run["name"]),
            max_steps=run["steps"],
            per_device_train_batch_size=2,
            gradient_accumulation_steps=run["ga"],
            **{checkpointing_field(): run["gc"]},  # activation_checkpointing (gradient_checkpointing on 5.18)
            learning_rate=run["lr"],
            lr_scheduler_type="constant",
            max_grad_norm=1.0,
            optim="badam",
            optim_args=run["optim_args"],
            save_strategy="no",
        )
        log = BlockLog()
        cls = Trainer if run["cls"] == "Trainer" else BAdamTrainer
        trainer = cls(model=model, args=args, train_dataset=Tokens(), callbacks=[log])
        trainer.train()
        opt = unwrap_optimizer(trainer.optimizer)
        sync = engine_sync(opt)
        final = params_cpu(trainer.model)
        torch.save({"initial": initial, "final": final}, os.path.join(out, f"{run['name']}_rank{rank}.pt"))
        write_json(
            os.path.join(out, f"{run['name']}_rank{rank}.json"),
            {
                "blocks": log.blocks,
                "block_params": [list(b.param_names) for b in opt.partition.blocks],
                "wrapped": type(trainer.model_wrapped).__name__,
                "rebuilds": sync.rebuilds,
                "world_size": args.world_size,
            },
        )
    finish()


if __name__ == "__main__":
    main()
