"""torchrun worker: Hugging Face Trainer + BAdam under DeepSpeed ZeRO-3 (CPU, gloo, DS_ACCELERATOR=cpu).

Usage: DS_ACCELERATOR=cpu PYTHONPATH=.. python -m torch.distributed.run --standalone --nproc_per_node 2 \
           deepspeed_trainer_worker.py OUT_DIR

Runs, with configs/deepspeed_zero3.json (its "auto" values filled by the Trainer):
1. a plain `Trainer` with `optim="badam"` (SGD inner optimizer, fp32);
2. a `BAdamTrainer` with gradient accumulation, gradient checkpointing and bf16 (AdamW);
3. save/resume: a `BAdamTrainer` (AdamW, fp32) run of 6 steps that saves at step 3 (mid-block), and a
   fresh one resumed from that checkpoint;
4. a model built under `deepspeed.zero.Init` (as `from_pretrained` does under ZeRO-3), so its parameters
   are already partitioned when the BlockOptimizer is built.
Each rank writes its initial and final full parameters (gathered from the ZeRO-3 shards) and the blocks
that took each step.
"""

from __future__ import annotations

import os
import sys

import torch

from dist_common import CPU_TRAINER_ARGS, Tokens, finish, params_cpu, write_json
from tiny_models import tiny_llama

import deepspeed  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from badam_hf import BAdamTrainer  # noqa: E402  (importing badam_hf registers --optim badam)
from badam_hf.core.optimizer import unwrap_optimizer  # noqa: E402
from badam_hf.core.hf_features import checkpointing_field  # noqa: E402
from badam_hf.engines.common import engine_sync

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "deepspeed_zero3.json")


class BlockLog(TrainerCallback):
    """Records the block that takes each optimizer step, and the optimizer's step count at the end."""

    def __init__(self):
        self.blocks = []
        self.steps = None

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.blocks.append(unwrap_optimizer(optimizer).active_block)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        self.steps = unwrap_optimizer(optimizer).global_step


def gathered(model) -> dict[str, torch.Tensor]:
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        with deepspeed.zero.GatheredParameters(params):
            return params_cpu(model)
    return params_cpu(model)


def make_args(out, name, steps, ga=1, gc=False, bf16=False, optim="badam", optim_args="", lr=0.5, save_steps=None):
    return TrainingArguments(
        **CPU_TRAINER_ARGS,
        output_dir=os.path.join(out, name),
        max_steps=steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=ga,
        **{checkpointing_field(): gc},
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # "auto" gradient_clipping -> no clipping, so steps are comparable
        bf16=bf16,
        optim=optim,
        optim_args=optim_args,
        deepspeed=CONFIG,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
    )


def zero_init_llama():
    """tiny_llama()'s architecture, built the way from_pretrained builds models under ZeRO-3."""
    from transformers import LlamaForCausalLM

    cfg = tiny_llama().config
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(cfg)  # under deepspeed.zero.Init while a ZeRO-3 config is alive


def run(out, rank, name, cls, args, resume=None, zero_init=False):
    model = zero_init_llama() if zero_init else tiny_llama()
    initial = gathered(model)
    log = BlockLog()
    try:
        trainer = cls(model=model, args=args, train_dataset=Tokens(), callbacks=[log])
    except Exception as e:  # recorded for the test (see test_trainer_zero3_zero_init_model)
        write_json(os.path.join(out, f"{name}_rank{rank}.json"), {"error": f"{type(e).__name__}: {e}"})
        return
    trainer.train(resume_from_checkpoint=resume)
    opt = unwrap_optimizer(trainer.optimizer)
    sync = engine_sync(opt)
    final = gathered(trainer.model)
    torch.save({"initial": initial, "final": final}, os.path.join(out, f"{name}_rank{rank}.pt"))
    write_json(
        os.path.join(out, f"{name}_rank{rank}.json"),
        {
            "blocks": log.blocks,
            "steps": log.steps,
            "block_params": [list(b.param_names) for b in opt.partition.blocks],
            "wrapped": type(trainer.model_wrapped).__name__,
            "sync": type(sync).__name__,
            "rebuilds": sync.rebuilds,
            "dtypes": sorted({str(t.dtype) for t in final.values()}),
            "world_size": args.world_size,
        },
    )
    trainer.model_wrapped.destroy()


def main():
    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    run(out, rank, "trainer_optim", Trainer,
        make_args(out, "trainer_optim", 10, optim_args="switch_every=2,switch_mode=ascending,inner_optimizer=sgd"))
    run(out, rank, "badam_trainer_ga_gc", BAdamTrainer,
        make_args(out, "badam_trainer_ga_gc", 6, ga=2, gc=True, bf16=True, lr=1e-2,
                  optim_args="switch_every=2,switch_mode=random"))
    resume_args = dict(steps=6, lr=1e-2, save_steps=3, optim_args="switch_every=2,switch_mode=ascending")
    run(out, rank, "full", BAdamTrainer, make_args(out, "full", **resume_args))
    ckpt = os.path.join(out, "full", "checkpoint-3")
    run(out, rank, "resumed", BAdamTrainer, make_args(out, "resumed", **resume_args), resume=ckpt)
    # (torch.distributed is initialised by now, as zero.Init needs)
    run(out, rank, "zero_init", BAdamTrainer,
        make_args(out, "zero_init", 4, optim_args="switch_every=2,switch_mode=ascending,inner_optimizer=sgd"),
        zero_init=True)
    finish()


if __name__ == "__main__":
    main()
