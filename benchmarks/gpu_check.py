"""The prepared GPU check: BAdam in the paper's Table 2 setting on one GPU, in one JSON.

    bash benchmarks/gpu_check.sh [--tiny] [--out FILE] [--blocks N]

A Llama-3-8B-shaped random-init model in bf16 with gradient checkpointing, batch 2 x seq 728 (the paper's
Table 2: 23.5 GB for BAdam on Llama 3-8B). Measured:
- BAdam's peak `torch.cuda.max_memory_allocated` and `max_memory_reserved` (whole process: weights included)
  against the paper's 23.5 GB;
- forward / backward / optimizer-step time per step with one active layer at a few evenly spaced depths (one
  warm-up step and one timed step each), and the mean backward against a full backward of the same model
  (every parameter trainable, no truncation);
- LoRA r=8 on q,v (peft, fused AdamW) on the same shape: peak memory and step time, for the ratios;
- the steady state: a block's first step and a later step at K >= 2 (`--switch-every`, default 100), each with
  its own peak.
Beside every measured `max_memory_allocated` stands the dry run's prediction (`badam_hf.tools.dry_run`: the
same step on meta tensors, computed before the GPU runs), so the first GPU run checks the simulation. In
`--tiny` mode the "measured" peaks of the steady state are live tensor bytes counted on the CPU tensors.

`--tiny` runs the same code on a small Llama on the CPU (CI's smoke test); without `--tiny` and without a CUDA
GPU it refuses in one line. Meant to finish in well under 8 minutes on one H100/H200-class GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

PAPER_BADAM_GB = 23.5  # Table 2 of arXiv 2404.02827: Llama 3-8B, batch 2, seq 728, gradient checkpointing
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, batch=2, seq=728),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, batch=2, seq=32),
}


def build(shape: dict, device, seed: int = 0):
    """The bench's random-init Llama (bf16, built on the device), in train mode with gradient checkpointing."""
    import torch

    from bench import build_model  # benchmarks/bench.py, next to this script

    model = build_model(shape, torch.bfloat16, seed, device)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


class Clock:
    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def memory(device) -> dict:
    import torch

    if device.type != "cuda":
        from badam_hf.tools.harness import peak_rss_bytes

        return {"peak_rss_gb": peak_rss_bytes() / 1e9}
    return {"max_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
            "max_reserved_gb": torch.cuda.max_memory_reserved() / 1e9}


def reset_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def loss_context(model, opt):
    """The loss BAdamTrainer and --optim badam train with: chunked (on by default) where the model allows it;
    the same choice the dry run makes, so measured and predicted peaks count the same tensors."""
    import contextlib

    from badam_hf.core.optimizer import BlockOptimizer
    from badam_hf.integrations.chunked_loss import chunked_causal_lm_loss, unsupported_reason

    if isinstance(opt, BlockOptimizer) and opt.config.chunked_loss and unsupported_reason(model) is None:
        return chunked_causal_lm_loss(model, opt.config.loss_chunk_tokens)
    return contextlib.nullcontext()


def one_step(model, opt, ids, clock) -> tuple[float, float, float]:
    t0 = clock.now()
    with loss_context(model, opt):
        # Every position labelled (shift_labels), as in the dry run's inputs.
        loss = model(input_ids=ids, labels=ids, shift_labels=ids).loss
    t1 = clock.now()
    loss.backward()
    t2 = clock.now()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = clock.now()
    return t1 - t0, t2 - t1, t3 - t2


def check_badam(shape: dict, device, blocks: int, ids) -> dict:
    import torch

    from badam_hf.core.optimizer import BlockOptimizer

    reset_memory(device)
    model = build(shape, device)
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    opt = BlockOptimizer(model, lr=1e-5, switch_every=1, switch_mode="ascending")
    clock = Clock(device)
    D = opt.num_blocks
    depths = sorted({round(i * (D - 1) / max(blocks - 1, 1)) for i in range(blocks)})
    per_block = []
    for b in depths:
        opt.seek(b)  # K=1 ascending: step b trains block b; one warm-up step on it, then one timed
        one_step(model, opt, ids, clock)
        opt.seek(b)
        f, bk, s = one_step(model, opt, ids, clock)
        per_block.append({"block": b, "forward_s": f, "backward_s": bk, "step_s": s})
    mem = memory(device)
    # A full backward for the paper's comparison: everything trainable, no truncation. On a fresh model, since
    # the optimizer's hooks stay on the one it trained (its active block's gradients would go to fp32 buffers).
    fp32_acc, fused = opt.config.fp32_grad_accumulation, bool(opt.inner.defaults.get("fused"))
    del model, opt
    reset_memory(device)
    model = build(shape, device)
    full = []
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        t0 = clock.now()
        loss.backward()
        full.append(clock.now() - t0)
        # What the baseline's backward reached: every parameter, or the ratio compares two truncated backwards.
        full_grads = sum(p.grad is not None for p in model.parameters())
        model.zero_grad(set_to_none=True)
    mean = lambda xs: sum(xs) / len(xs)
    out = {
        "num_blocks": D,
        "weights_gb": weights_gb,
        "memory": mem,
        "paper_badam_gb": PAPER_BADAM_GB,
        "per_block": per_block,
        "forward_s": mean([r["forward_s"] for r in per_block]),
        "backward_s": mean([r["backward_s"] for r in per_block]),
        "optimizer_step_s": mean([r["step_s"] for r in per_block]),
        "full_backward_s": full[-1],
        "full_backward_params_with_grad": full_grads,
        "num_params": sum(1 for _ in model.parameters()),
        "fp32_grad_accumulation": fp32_acc,
        "inner_fused": fused,
    }
    out["backward_vs_full"] = out["backward_s"] / out["full_backward_s"]
    if device.type == "cuda":
        out["allocated_vs_paper"] = mem["max_allocated_gb"] / PAPER_BADAM_GB
    del model
    return out


def check_lora(shape: dict, device, ids, steps: int = 3) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    reset_memory(device)
    model = build(shape, device)
    model.enable_input_require_grads()  # checkpointing with frozen embeddings needs it under LoRA
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    # fused, as HF Trainer's default optimizer (adamw_torch_fused) and the dry run's prediction
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    clock = Clock(device)
    one_step(model, opt, ids, clock)
    times = [one_step(model, opt, ids, clock) for _ in range(steps)]
    mem = memory(device)
    mean = lambda i: sum(t[i] for t in times) / len(times)
    out = {"memory": mem, "forward_s": mean(0), "backward_s": mean(1), "optimizer_step_s": mean(2)}
    del model
    return out


def dry_run_setting(shape: dict, switch_every: int):
    """The dry run's setting for the model `build` makes (bench.build_model's config, sdpa, checkpointing)."""
    from transformers import LlamaConfig

    from badam_hf.tools.dry_run import Setting

    cfg = LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"], max_position_embeddings=max(2048, shape["seq"]),
        tie_word_embeddings=False, use_cache=False,
    )
    return Setting(config=cfg, name="gpu_check", batch=shape["batch"], seq=shape["seq"],
                   badam={"switch_every": switch_every})


def predict(shape: dict, switch_every: int) -> dict:
    """The dry run's peaks (bytes) for every memory this script measures; meta tensors, before any GPU work."""
    import dataclasses

    from badam_hf.tools.dry_run import run_method

    t0 = time.perf_counter()
    setting = dry_run_setting(shape, switch_every)
    k1 = run_method(dataclasses.replace(setting, badam={"switch_every": 1}), "badam")
    steady = run_method(setting, "badam")
    lora = run_method(setting, "lora")
    return {
        "badam_k1": k1["peak_bytes"],
        "steady_state": [{"step": s["step"], "peak_bytes": s["peak_bytes"], "phase": s["phase"],
                          "alive_at_peak": s["alive_at_peak"]} for s in steady["steps"]],
        "lora": lora["peak_bytes"],
        "dry_run_s": time.perf_counter() - t0,
    }


def check_steady_state(shape: dict, device, ids, switch_every: int, predicted: dict) -> dict:
    """A block's first step and a later step (K >= 2), each with its own peak, and a checkpoint save between
    them (the optimizer's state dict, mid-visit), beside the dry run's."""
    import torch

    from badam_hf.core.optimizer import BlockOptimizer
    from badam_hf.tools.dry_run import StorageCounter

    reset_memory(device)
    model = build(shape, device)
    # Block 0 first (ascending), as the dry run: its backward runs through every layer.
    opt = BlockOptimizer(model, lr=1e-5, switch_every=switch_every, switch_mode="ascending")
    clock = Clock(device)
    cuda = device.type == "cuda"
    counter = None if cuda else StorageCounter()
    if counter is not None:
        counter.track(list(model.parameters()) + list(model.buffers()) + [ids])
    steps, saves = [], []
    preds = [p for p in predicted["steady_state"] if p["step"] != "checkpoint save"]
    save_pred = next((p for p in predicted["steady_state"] if p["step"] == "checkpoint save"), None)

    def row(pred, measured):
        return {"step": pred["step"], "measured_bytes": measured, "predicted_bytes": pred["peak_bytes"],
                "predicted_phase": pred["phase"], "measured_over_predicted": measured / pred["peak_bytes"]}

    for i, pred in enumerate(preds):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            one_step(model, opt, ids, clock)
            measured = torch.cuda.max_memory_allocated()
        else:
            with counter:
                counter.reset_peak()
                one_step(model, opt, ids, clock)
            measured = counter.peak
        steps.append(row(pred, measured))
        if i == 0 and save_pred is not None:  # the dry run saves after a block's first step, mid-visit
            saves.append(row(save_pred, measure_save(opt, counter)))
    steps += saves
    del model, opt
    return {"switch_every": switch_every,
            "measured_by": "torch.cuda.max_memory_allocated" if cuda else "live tensor bytes of the CPU tensors",
            "steps": steps}


def measure_save(opt, counter) -> int:
    """The peak of building the optimizer's state dict: CUDA's max_memory_allocated around the real one (its
    masters go to the host), or, on the CPU, live tensor bytes with the host copies dropped (there they would be
    the same memory), as the dry run counts it."""
    import torch

    from badam_hf.core import checkpoint

    if counter is None:
        torch.cuda.reset_peak_memory_stats()
        state = opt.state_dict()
        measured = torch.cuda.max_memory_allocated()
        del state
        return measured
    with counter:
        counter.reset_peak()
        checkpoint.state_dict(opt, to_host=lambda t: None)
    return counter.peak


def format_predictions(result: dict) -> str:
    """Every measured peak beside the dry run's prediction, one line each."""
    gb = 1e9
    rows = ["", "measured peak vs the dry run's prediction (GB):"]
    for name, key in (("BAdam K=1, per-block steps", "badam"), ("LoRA r8", "lora_r8_qv")):
        mem = result[key]["memory"]
        got = mem.get("max_allocated_gb")
        rows.append(f"  {name}: measured {'%.3f' % got if got is not None else 'n/a (no GPU)'}, "
                    f"predicted {mem['predicted_max_allocated_gb']:.3f}")
    ss = result["steady_state"]
    for s in ss["steps"]:
        rows.append(f"  BAdam {s['step']}: measured {s['measured_bytes'] / gb:.3f} ({ss['measured_by']}), "
                    f"predicted {s['predicted_bytes'] / gb:.3f} at {s['predicted_phase']}")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a small Llama on the CPU (the CI smoke test)")
    p.add_argument("--out", default=None, help="the JSON file (default benchmarks/results/gpu_check[_tiny].json)")
    p.add_argument("--blocks", type=int, default=4, help="active-layer depths timed (evenly spaced), default 4")
    p.add_argument("--switch-every", dest="switch_every", type=int, default=100,
                   help="K of the steady-state check (a block's first step, then a later step), default 100")
    args = p.parse_args(argv)
    if args.blocks < 1:
        p.error(f"--blocks {args.blocks}: give at least 1")
    if args.switch_every < 2:
        p.error(f"--switch-every {args.switch_every}: give at least 2 (a later step needs K >= 2)")
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); use --tiny for the CPU smoke run.",
              file=sys.stderr)
        return 2
    shape = SHAPES["tiny" if args.tiny else "llama3-8b"]
    device = torch.device("cpu" if args.tiny else "cuda")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=g).to(device)
    t0 = time.perf_counter()
    result = {
        "shape": "tiny" if args.tiny else "llama3-8b",
        "model": {k: v for k, v in shape.items() if k not in ("batch", "seq")},
        "batch": shape["batch"], "seq": shape["seq"], "gradient_checkpointing": True, "dtype": "bfloat16",
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "torch": torch.__version__,
    }
    predicted = predict(shape, args.switch_every)
    result["predicted"] = predicted
    result["badam"] = check_badam(shape, device, args.blocks, ids)
    result["badam"]["memory"]["predicted_max_allocated_gb"] = predicted["badam_k1"] / 1e9
    result["lora_r8_qv"] = check_lora(shape, device, ids)
    result["lora_r8_qv"]["memory"]["predicted_max_allocated_gb"] = predicted["lora"] / 1e9
    result["steady_state"] = check_steady_state(shape, device, ids, args.switch_every, predicted)
    key = "max_allocated_gb" if device.type == "cuda" else "peak_rss_gb"
    b, lo = result["badam"], result["lora_r8_qv"]
    result["ratios"] = {
        "badam_vs_lora_memory": b["memory"][key] / lo["memory"][key],
        "badam_vs_lora_backward": b["backward_s"] / lo["backward_s"],
        "badam_vs_lora_step": (b["forward_s"] + b["backward_s"] + b["optimizer_step_s"])
        / (lo["forward_s"] + lo["backward_s"] + lo["optimizer_step_s"]),
    }
    result["wall_s"] = time.perf_counter() - t0
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   "gpu_check_tiny.json" if args.tiny else "gpu_check.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    print(format_predictions(result))
    print(f"gpu_check: wrote {out} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
