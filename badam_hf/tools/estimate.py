"""Memory estimates per method, counted from a model config without allocating weights.

Byte conventions follow the paper's Table 2 (mixed precision): weights in bf16 (2 bytes per
parameter); a trained parameter carries an fp32 gradient (4) and fp32 master + two Adam moments (12).
So Adam needs 2 + 4 + 12 = 18 bytes per parameter, and BAdam 2 per parameter plus 16 per parameter of
its largest block. That is what `BlockOptimizer` holds: with `fp32_grad_accumulation` (the default) the
active block's gradients go straight into one fp32 buffer (4 bytes; no bf16 gradient of 2 more bytes is
kept), and its master is made at the block's first step, after that step's backward, and held as its 16
low bits between steps (`split_masters`). Activations are a rough estimate (see `activation_bytes`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import PartitionConfig
from ..core.hf_features import checkpointing_field
from ..core.partition import partition_model
from .model_shapes import BUILTIN_SHAPES, load_config  # noqa: F401  (part of this module's interface)

GB = 1e9

def build_meta_model(config) -> nn.Module:
    """The model with every tensor on the meta device: shapes without memory."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if config.model_type in ("roberta", "bert") else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


@dataclass
class Estimate:
    method: str
    weights: float
    gradients: float
    optimizer_states: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer_states + self.activations


def loss_temporary_bytes(config, batch: int, seq: int, task: str = "causal-lm") -> float:
    """The loss's fp32 tensors of the logits alive when backward starts at the loss (a causal LM): the upcast
    logits saved by log-softmax, its output, and the gradient flowing back, B x S x vocab x 4 bytes each.
    (What the dry run finds at the peak of a later step; the bf16 logits are gone by then.)"""
    if task != "causal-lm":
        return 0.0
    return 3 * 4 * batch * seq * config.vocab_size


def chunked_loss_bytes(config, batch: int, seq: int, chunk_tokens: int, task: str = "causal-lm") -> float:
    """What BAdam's chunked loss (`chunked_loss`, on by default) holds instead: one chunk's logits in bf16 and
    fp32 and their gradient (about 8 bytes x chunk x vocab), plus the labelled tokens' hidden states gathered
    for the head (measured in docs/memory-chunked-loss.md)."""
    if task != "causal-lm":
        return 0.0
    return 8 * min(chunk_tokens, batch * seq) * config.vocab_size + 2 * batch * seq * config.hidden_size


def activation_bytes(config, batch: int, seq: int, gradient_checkpointing: bool, task: str = "causal-lm",
                     dtype_bytes: int = 2) -> float:
    """Activations alive when backward starts at the loss, where the dry run puts the peak of every method
    that holds no gradients there. With checkpointing: each layer's input (its checkpoint) plus the loss's
    temporaries. Without it (not checked against the dry run): about seq*batch*hidden*34 bytes per layer
    (Korthikanti et al., 2022, with flash attention: no score matrix) plus the loss's temporaries."""
    h, L = config.hidden_size, config.num_hidden_layers
    loss = loss_temporary_bytes(config, batch, seq, task)
    if gradient_checkpointing:
        return L * dtype_bytes * batch * seq * h + loss
    return L * seq * batch * h * 34 * dtype_bytes / 2 + loss


def estimate(
    model: str,
    gpus: int = 1,
    batch: int = 1,
    seq: int = 512,
    gradient_checkpointing: bool = True,
    granularity: str = "layer",
    lora_rank: int = 8,
    dtype: str = "bfloat16",
    loss_chunk_tokens: int | None = 256,
) -> tuple[dict, list[Estimate]]:
    """The formula's peak per method: the larger of two moments the dry run (`--exact`) shows to be the
    peaks. At the optimizer step: weights and every trained parameter's fp32 gradient, master and moments
    (16 bytes; 12 for fp32 weights, which need no master), no activations. When backward starts at the
    loss: weights, what lives between steps (moments, BAdam's master low halves, AdamW's master) and the
    gradients made there, plus the checkpoints and the loss's fp32 logits tensors (BAdam: one chunk's, unless
    `loss_chunk_tokens` is None, i.e. chunked_loss=false). A later step's other moment is the master rebuild
    at its optimizer step, which holds what the first step holds (the low halves go as the masters come)."""
    for name, value in (("gpus", gpus), ("batch", batch), ("seq", seq), ("lora_rank", lora_rank)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}: {name} must be a whole number >= 1.")
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype={dtype!r}: choose 'bfloat16' or 'float32'.")
    config = load_config(model)
    meta = build_meta_model(config)
    task = "causal-lm" if meta.get_output_embeddings() is not None else "sequence-classification"
    total = sum(p.numel() for p in meta.parameters())
    partition = partition_model(meta, PartitionConfig(granularity=granularity, always_active=[]))
    params = dict(meta.named_parameters())
    block_sizes = [sum(params[n].numel() for n in b.param_names) for b in partition.blocks]
    active = max(block_sizes)
    w = 2 if dtype == "bfloat16" else 4
    master = 4 if dtype == "bfloat16" else 0  # fp32 weights are their own master
    low = 2 if dtype == "bfloat16" else 0  # BAdam keeps a bf16 block's master as its 16 low bits between steps
    act = activation_bytes(config, batch, seq, gradient_checkpointing, task, dtype_bytes=w)
    act_badam = act if loss_chunk_tokens is None else (
        act - loss_temporary_bytes(config, batch, seq, task) + chunked_loss_bytes(config, batch, seq, loss_chunk_tokens, task))
    # LoRA on the q/v projections (the paper's setting): two rank-r matrices per adapted projection, in fp32
    # (peft upcasts adapters of bf16 weights).
    h, L = config.hidden_size, config.num_hidden_layers
    kv = h * getattr(config, "num_key_value_heads", config.num_attention_heads) // config.num_attention_heads
    lora = L * lora_rank * ((h + h) + (h + kv))
    largest_matrix = max(p.numel() for p in meta.parameters())
    head = meta.get_output_embeddings()
    head = head.weight.numel() if head is not None else 0
    n = gpus

    def larger(*moments: Estimate) -> Estimate:
        return max(moments, key=lambda e: e.total)

    if master:  # bf16 weights: AdamW's fp32 gradient buffer is made at the first gradient, the head's (bf16)
        adam = Estimate("Adam (mixed precision)", w * total / n, (4 * total + w * head) / n, (master + 8) * total / n,
                        act - loss_temporary_bytes(config, batch, seq, task))
    else:  # fp32 weights: gradients arrive one by one; all of them and the moments at the step
        adam = larger(Estimate("Adam (mixed precision)", w * total / n, 4 * total / n, 8 * total / n, 0.0),
                      Estimate("Adam (mixed precision)", w * total / n, 0.0, 8 * total / n, act))
    rows = [
        adam,
        Estimate(f"LoRA (rank {lora_rank})", (w * total + 4 * lora) / n, 0.0, 8 * lora / n, act),
        Estimate("LOMO", w * total / n, 2 * largest_matrix, 0.0, act),
        # A block's first step: at its optimizer step, or at the loss (no state yet) when the loss is larger.
        larger(Estimate("BAdam", w * total / n, 4 * active / n, (master + 8) * active / n, 0.0),
               Estimate("BAdam", w * total / n, 0.0, 0.0, act_badam)),
        # A later step: at the loss with moments and low halves, or at the master rebuild of its optimizer step.
        larger(Estimate("BAdam (later step)", w * total / n, 0.0, (low + 8) * active / n, act_badam),
               Estimate("BAdam (later step)", w * total / n, 4 * active / n, (master + 8) * active / n, 0.0)),
    ]
    info = {
        "model": model,
        "parameters": total,
        "blocks": len(partition),
        "largest_block": active,
        "gpus": n,
        "batch": batch,
        "seq": seq,
        "gradient_checkpointing": gradient_checkpointing,
        "dtype": dtype,
    }
    return info, rows


def format_table(info: dict, rows: list[Estimate]) -> str:
    per = " per GPU" if info["gpus"] > 1 else ""
    lines = [
        f"{info['model']}: {info['parameters'] / 1e9:.2f}B parameters, BAdam D={info['blocks']} blocks "
        f"(largest {info['largest_block'] / 1e6:.1f}M), batch {info['batch']} x seq {info['seq']}, "
        f"gradient checkpointing {'on' if info['gradient_checkpointing'] else 'off'}, {info['gpus']} GPU(s)",
        "",
        f"| method | weights | gradients | optimizer states | activations (est.) | total{per} |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.weights / GB:.1f} GB | {r.gradients / GB:.1f} GB | {r.optimizer_states / GB:.1f} GB "
            f"| {r.activations / GB:.1f} GB | {r.total / GB:.1f} GB |"
        )
    lines += ["", "BAdam: the first step of a block holds 16 bytes per active parameter at its optimizer step (fp32 "
              "gradient, master, two moments); a later step (K >= 2) keeps the master as its 16 low bits and peaks "
              "when backward starts at the loss (checkpoints + the loss's fp32 logits tensors). "
              "`--exact` runs the real step on meta tensors instead of this formula."]
    if not info["gradient_checkpointing"]:
        lines += ["Without gradient checkpointing the activations are a rough per-layer estimate the dry run does not "
                  "confirm (RoBERTa-large, batch 16 x 256, fp32: BAdam 27% above it); use --exact."]
    return "\n".join(lines)


# --- --exact: the real step on meta tensors (tools/dry_run.py) ---------------------------------------------

# The shipped recipes' models, by the built-in shape that has their architecture.
RECIPE_SHAPES = {
    "meta-llama/Llama-2-7b-hf": "llama2-7b",
    "meta-llama/Meta-Llama-3-8B": "llama3-8b",
    "meta-llama/Meta-Llama-3-70B": "llama3-70b",
    "FacebookAI/roberta-large": "roberta-large",
}
KIND_ORDER = ("weights", "adapter weights", "gradients", "fp32 gradients", "masters", "low halves", "moments",
              "activations", "loss temporaries", "backward temporaries", "optimizer temporaries", "inputs", "other")


def exact_setting(model: str, batch: int | None = None, seq: int | None = None,
                  gradient_checkpointing: bool | None = None, badam: dict | None = None,
                  lora_rank: int = 8, dtype: str | None = None):
    """The dry run's `Setting` for MODEL: a built-in shape, a local config.json or model folder, or a
    recipe (a shipped recipe's name or a .yaml), whose batch, cutoff length, checkpointing, dtype and BAdam
    keys are used unless given here. Defaults otherwise: batch 2 x seq 728, checkpointing on, bf16."""
    import torch

    from .dry_run import Setting

    for name, value in (("batch", batch), ("seq", seq), ("lora_rank", lora_rank)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name}={value!r}: {name} must be a whole number >= 1.")
    keys: dict = {}
    recipe = None
    if model not in BUILTIN_SHAPES and not os.path.exists(model) or model.endswith((".yaml", ".yml")):
        try:
            from ..recipes import RecipeError, load_recipe
        except ImportError:  # pragma: no cover
            RecipeError, load_recipe = Exception, None
        try:
            recipe = load_recipe(model) if load_recipe else None
        except RecipeError:
            recipe = None
    task = None
    if recipe is not None:
        if recipe.task == "multiple-choice":
            raise ValueError(f"{model}: a multiple-choice recipe; --exact simulates causal-LM and "
                             "sequence-classification recipes.")
        name = recipe.model["name_or_path"]
        shape = RECIPE_SHAPES.get(name, name)
        config = load_config(shape)
        keys = dict(recipe.badam_flat)
        batch = batch or recipe.training.get("per_device_train_batch_size", 8)
        seq = seq or recipe.data.get("cutoff_len", 1024)
        if gradient_checkpointing is None:
            gradient_checkpointing = bool(recipe.training.get(checkpointing_field(), False))
        dtype = dtype or recipe.model.get("dtype", "bfloat16")
        task = "causal-lm" if recipe.task == "causal-lm" else "sequence-classification"
        label = f"{model} ({shape})"
    else:
        config = load_config(model)
        label = model
    keys.update(badam or {})
    dtype = dtype or "bfloat16"
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype={dtype!r}: choose 'bfloat16' or 'float32'.")
    kw = {} if task is None else {"task": task}
    if task is None:
        kw["task"] = "sequence-classification" if config.model_type in ("roberta", "bert") else "causal-lm"
    limit = getattr(config, "max_position_embeddings", None)
    seq = seq or 728
    if limit and seq > limit - (2 if config.model_type == "roberta" else 0):
        raise ValueError(f"seq={seq}: {label} takes at most {limit} positions.")
    return Setting(config=config, name=label, batch=batch or 2, seq=seq,
                   dtype=getattr(torch, dtype), gradient_checkpointing=True if gradient_checkpointing is None
                   else gradient_checkpointing, badam=keys, lora_rank=lora_rank, **kw)


def exact(setting, methods=("badam", "adamw", "lora"), device: str = "meta") -> dict:
    """`--exact`: every method's per-step peaks from the real step (see `badam_hf.tools.dry_run`)."""
    from .dry_run import METHODS, dry_run

    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"--methods {','.join(methods)}: choose from {', '.join(METHODS)}.")
    if device not in ("meta", "cpu"):
        raise ValueError(f"--device {device!r}: choose 'meta' (any size, no memory) or 'cpu' (real tensors).")
    return dry_run(setting, methods, device)


def to_json(result: dict) -> dict:
    """The `--json` document: {model, batch, seq, methods: {m: {peak_bytes, steps: [{step, peak_bytes,
    phase, alive_at_peak}]}}}."""
    return {
        "model": result["model"], "batch": result["batch"], "seq": result["seq"],
        "methods": {
            m: {"peak_bytes": r["peak_bytes"],
                "steps": [{k: s[k] for k in ("step", "peak_bytes", "phase", "alive_at_peak")} for s in r["steps"]]}
            for m, r in result["methods"].items()
        },
    }


METHOD_NAMES = {"badam": "BAdam", "adamw": "AdamW (mixed precision)", "lora": "LoRA"}


def format_exact(setting, result: dict, device: str = "meta") -> str:
    lines = [
        f"{setting.name}: batch {setting.batch} x seq {setting.seq}, {str(setting.dtype).replace('torch.', '')} "
        f"weights, gradient checkpointing {'on' if setting.gradient_checkpointing else 'off'}; the real step on "
        f"{device} tensors in {result['wall_s']:.0f} s",
        "",
        "| method | step | peak | where | alive at the peak |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for m, r in result["methods"].items():
        for s in r["steps"]:
            alive = sorted(s["alive_at_peak"].items(),
                           key=lambda kv: KIND_ORDER.index(kv[0]) if kv[0] in KIND_ORDER else len(KIND_ORDER))
            parts = ", ".join(f"{k} {v / GB:.3f}" for k, v in alive if v >= 0.0005 * GB) or "-"
            lines.append(f"| {METHOD_NAMES[m]} | {s['step']} | {s['peak_bytes'] / GB:.2f} GB | {s['phase']} | {parts} |")
    worst = max((s["peak_bytes_cuda_rounded"] - s["peak_bytes"] for r in result["methods"].values()
                 for s in r["steps"]), default=0)
    lines += ["", "Peaks are live tensor bytes (torch.cuda.max_memory_allocated counts the same tensors). The CUDA "
              f"caching allocator rounds each tensor up to a multiple of 512 bytes: at most {worst / 1e6:.2f} MB more "
              "here. Not counted: what CUDA kernels allocate inside (cuBLAS workspace, flash attention's backward "
              "accumulators: tens of MB), the CUDA context (~0.5 GB, outside max_memory_allocated) and the "
              "allocator's cache and fragmentation (in max_memory_reserved)."]
    return "\n".join(lines)


# --- the memory table of docs/memory.md ------------------------------------------------------------------

# (MODEL or recipe, overrides, the paper's figure for the same setting where this repository states one)
TABLE_ROWS = (
    ("llama3-8b", dict(batch=2, seq=728), "BAdam 23.5 GB (Table 2: weights 16.1, gradient 0.9, optimizer "
                                          "states 2.6; Adam 16.1 / 32.1 / 96.4)"),
    ("llama2-7b-alpaca-gpt4", {}, ""),
    ("llama3-8b-alpaca-gpt4", {}, ""),
    ("llama3-70b-mathinstruct", {}, "run on 4 x A100-80GB"),
    ("roberta-large-superglue-boolq", {}, ""),
)


def memory_table(rows=TABLE_ROWS, methods=("badam", "adamw", "lora"), log=None, json_dir: str | None = None) -> str:
    """docs/memory.md's table: the simulated peak per GPU (one device, no sharding) for each row."""
    import platform

    import torch
    import transformers

    out = ["| model or recipe | batch x seq | BAdam, first step of a block | BAdam, later step | AdamW (mixed "
           "precision) | LoRA r=8 (q, v) | paper |", "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for model, kw, paper in rows:
        setting = exact_setting(model, **kw)
        result = exact(setting, methods)
        cells = []
        r = result["methods"].get("badam")
        steps = r["steps"] if r else []
        for i in range(2):
            s = steps[i] if i < len(steps) else None
            cells.append(f"{s['peak_bytes'] / GB:.2f} GB ({s['phase']})" if s else "-")
        for m in ("adamw", "lora"):
            r = result["methods"].get(m)
            cells.append(f"{r['peak_bytes'] / GB:.2f} GB" if r else "-")
        dtype = str(setting.dtype).replace("torch.", "")
        out.append(f"| `{model}` ({dtype}) | {setting.batch} x {setting.seq} | " + " | ".join(cells) + f" | {paper or '-'} |")
        if log:
            log(f"{model}: {result['wall_s']:.0f} s")
        if json_dir:
            with open(os.path.join(json_dir, f"{model}.json"), "w") as f:
                json.dump(to_json(result) | {"wall_s": result["wall_s"]}, f, indent=1)
    out += ["", f"Simulated with torch {torch.__version__}, transformers {transformers.__version__} on "
            f"{platform.machine()} ({platform.processor() or 'cpu'}); regenerate with "
            "`python -m badam_hf.tools.estimate`."]
    return "\n".join(out)


if __name__ == "__main__":
    import sys
    import warnings

    warnings.simplefilter("ignore")
    # python -m badam_hf.tools.estimate [DIR]: the table on stdout, each row's --json document in DIR
    print(memory_table(log=lambda s: print(s, file=sys.stderr), json_dir=sys.argv[1] if len(sys.argv) > 1 else None))
