"""Running: build, train, save the model (`save_full_model`) and print the end summary (`run`).

Imports `build` and `validate` of `badam_hf.recipes`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..core.optimizer import unwrap_optimizer
from ..integrations.cpu_compute import fp32_linear_compute
from ..integrations.trainer import save_full_model
from .builder import build
from .validate import Recipe


def _peak_memory() -> str:
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA, max allocated)"
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024
    return f"{peak_bytes / 2**30:.2f} GiB (peak RSS of this process)"


def run(recipe: Recipe, out=None) -> dict:
    """Build and train; save the model to `training.output_dir`; print and return a summary."""
    start = time.perf_counter()
    built = build(recipe)
    trainer = built.trainer
    with fp32_linear_compute():  # CPU bf16 products in fp32 where the CPU lacks bf16 arithmetic
        result = trainer.train()
        save_full_model(trainer)  # the full weights, also under a sharded FSDP state dict
        metrics = {}
        if built.eval_size:  # the held-out set at the end, whatever the evaluation strategy during training
            metrics = trainer.evaluate()
    elapsed = time.perf_counter() - start
    opt = unwrap_optimizer(trainer.optimizer)
    steps = trainer.state.global_step
    blocks = sorted({b for s in range(steps) for b in opt.schedule.active_at(s)}) if opt is not None else []
    names = [opt.partition.blocks[b].name for b in blocks] if opt is not None else []
    summary = {
        "steps": steps,
        "blocks_visited": blocks,
        "block_names": names,
        "num_blocks": opt.num_blocks if opt is not None else None,
        "time_s": elapsed,
        "peak_memory": _peak_memory(),
        "output_dir": str(Path(trainer.args.output_dir).resolve()),
        "train_loss": result.training_loss,
        "train_examples": built.train_size,
        "eval_examples": built.eval_size,
        "eval_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }
    if not trainer.is_world_process_zero():
        return summary  # one summary per run, not one per process
    print_summary(recipe, summary, out)
    return summary


def print_summary(recipe: Recipe, summary: dict, out=None) -> None:
    """The end-of-run report of `badam-hf train` (steps, blocks visited, loss, time, memory, eval, output)."""
    out = sys.stdout if out is None else out
    names = summary["block_names"]
    shown = ", ".join(names) if len(names) <= 6 else f"{', '.join(names[:3])}, ..., {names[-1]}"
    print(f"\nbadam-hf train: {recipe.path}", file=out)
    print(f"  steps:          {summary['steps']}", file=out)
    print(f"  blocks visited: {len(summary['blocks_visited'])} of {summary['num_blocks']} ({shown})", file=out)
    print(f"  train loss:     {summary['train_loss']:.4f}", file=out)
    print(f"  time:           {summary['time_s']:.1f} s", file=out)
    print(f"  peak memory:    {summary['peak_memory']}", file=out)
    if summary["eval_metrics"]:
        print("  eval:           " + ", ".join(f"{k}={v:.4g}" for k, v in summary["eval_metrics"].items()), file=out)
    print(f"  model saved to: {summary['output_dir']}", file=out)
