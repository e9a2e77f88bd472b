"""torchrun worker: Hugging Face Trainer + accelerate FSDP2 + BAdam on CPU (gloo), 2 processes.

Usage: PYTHONPATH=.. python -m torch.distributed.run --standalone --nproc_per_node 2 fsdp_trainer_worker.py OUT_DIR

accelerate turns FSDP on only for GPU-like backends and silently falls back to DDP on CPU. This worker
(test code only) makes every AcceleratorState keep the FSDP plugin on CPU, so the real Trainer/accelerate
FSDP2 path (optimizer built first, model sharded in place by `accelerator.prepare`, checkpoints through
`save_fsdp_model` / `save_fsdp_optimizer`) runs here.
"""

from __future__ import annotations

import os
import sys

import torch

from dist_common import CPU_TRAINER_ARGS, Tokens, enable_accelerate_fsdp_on_cpu, error_of, finish, write_json
from tiny_models import tiny_llama

enable_accelerate_fsdp_on_cpu()

from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from badam_hf import BAdamTrainer  # noqa: E402  (registers --optim badam)
from badam_hf.distributed import DistributedSetupError  # noqa: E402
from badam_hf.core.optimizer import unwrap_optimizer  # noqa: E402
from badam_hf.core.hf_features import checkpointing_field  # noqa: E402
from badam_hf.engines.common import engine_sync


def canonical(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")  # accelerate's activation checkpointing wrapper


def full_params(model) -> dict[str, torch.Tensor]:
    return {
        canonical(n): (p.full_tensor() if isinstance(p, DTensor) else p).detach().to("cpu", torch.float32, copy=True)
        for n, p in model.named_parameters()
    }


class StepLog(TrainerCallback):
    """Per optimizer step: the block that took it and the parameters it changed (gathered on all ranks)."""

    def __init__(self):
        self.records, self._before, self._block = [], None, None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._before = full_params(model)
        self._block = unwrap_optimizer(optimizer).active_block

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        after = full_params(model)
        changed = [n for n in after if not torch.equal(after[n], self._before[n])]
        self.records.append({"block": self._block, "changed": changed})


RUNS = [
    # bf16 weights, bf16=False: BAdam's fp32 masters over the local shards (the recommended FSDP2 setting).
    dict(name="badam_bf16", cls="BAdamTrainer", dtype=torch.bfloat16, bf16=False, steps=6,
         optim_args="switch_every=1,switch_mode=ascending", lr=1e-2),
    # Plain Trainer with --optim badam, fp32 weights computed in bf16 (accelerate's FSDP2 mixed precision).
    dict(name="optim_fp32_mp", cls="Trainer", dtype=torch.float32, bf16=True, steps=5,
         optim_args="switch_every=1,switch_mode=descending", lr=1e-2),
]
# As badam_bf16, with accelerate's cpu_ram_efficient_loading (the 70B config): the model is moved to the meta
# device, sharded, and filled from rank 0's weights. Rank 1 starts from zeros, as a from_pretrained model on a
# non-main rank does (empty weights); the run must still equal badam_bf16 bit for bit.
RAM_EFFICIENT = dict(RUNS[0], name="ram_efficient", ram_efficient=True)
# As badam_bf16, with accelerate's own activation checkpointing (which wraps each layer, renaming parameters).
FSDP_AC = dict(RUNS[0], name="fsdp_ac", fsdp_ac=True)
# With the recipes' gradient checkpointing (HF's default checkpointing arguments).
RESUME = dict(name="resume", cls="BAdamTrainer", dtype=torch.bfloat16, bf16=False, steps=6, gc=True,
              optim_args="switch_every=2,switch_mode=random,seed=5", lr=1e-2)


def make_trainer(run, out, callbacks=(), save_steps=None, state_dict_type="SHARDED_STATE_DICT"):
    model = tiny_llama(dtype=run["dtype"])
    if run.get("ram_efficient") and int(os.environ["RANK"]) != 0:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    args = TrainingArguments(
        **CPU_TRAINER_ARGS,
        output_dir=out,
        max_steps=run["steps"],
        per_device_train_batch_size=2,
        learning_rate=run["lr"],
        lr_scheduler_type="linear",
        optim="badam",
        optim_args=run["optim_args"],
        bf16=run["bf16"],
        **{checkpointing_field(): run.get("gc", False)},  # activation_checkpointing (gradient_checkpointing on 5.18)
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        fsdp=True,
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                     "state_dict_type": state_dict_type, "cpu_ram_efficient_loading": run.get("ram_efficient", False),
                     "activation_checkpointing": run.get("fsdp_ac", False)},
    )
    cls = Trainer if run["cls"] == "Trainer" else BAdamTrainer
    return cls(model=model, args=args, train_dataset=Tokens(seed=321), callbacks=list(callbacks))


def main():
    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    for run in RUNS + [RAM_EFFICIENT, FSDP_AC]:
        log = StepLog()
        trainer = make_trainer(run, os.path.join(out, run["name"]), [log])
        trainer.train()
        final = full_params(trainer.model)
        if rank == 0:
            torch.save(final, os.path.join(out, f"{run['name']}.pt"))
        opt = unwrap_optimizer(trainer.optimizer)
        local = {n: tuple(m.shape) for n, m in opt.masters.items()}
        full = {canonical(n): tuple(p.shape) for n, p in trainer.model.named_parameters()}
        write_json(os.path.join(out, f"{run['name']}_rank{rank}.json"), {
            "records": log.records,
            "block_params": [list(b.param_names) for b in opt.partition.blocks],
            "model_class": type(trainer.model).__name__,
            "sharded": all(isinstance(p, DTensor) for p in trainer.model.parameters()),
            "dtypes": sorted({str(p.dtype) for p in trainer.model.parameters()}),
            "master_shapes": {n: [local[n], full[n]] for n in local},
            "sync": type(engine_sync(opt)).__name__,
            "refreshes": engine_sync(opt).refreshes,
        })

    # Save mid-block at step 3, resume in a new Trainer: the final weights equal the uninterrupted run's.
    straight = make_trainer(RESUME, os.path.join(out, "resume"), save_steps=3)
    straight.train()
    final_straight = full_params(straight.model)
    resumed = make_trainer(RESUME, os.path.join(out, "resume"))
    resumed.train(resume_from_checkpoint=os.path.join(out, "resume", "checkpoint-3"))
    final_resumed = full_params(resumed.model)
    files = sorted(os.listdir(os.path.join(out, "resume", "checkpoint-3", "optimizer_badam")))
    if rank == 0:
        torch.save({"straight": final_straight, "resumed": final_resumed}, os.path.join(out, "resume.pt"))

    # bf16 weights with bf16=True: accelerate would upcast only the first block; refused before any step.
    refused = error_of(lambda: make_trainer(dict(RUNS[0], bf16=True), os.path.join(out, "refused")).train(),
                       DistributedSetupError)
    write_json(os.path.join(out, f"resume_rank{rank}.json"), {"files": files, "refused": refused})
    finish()


if __name__ == "__main__":
    main()
