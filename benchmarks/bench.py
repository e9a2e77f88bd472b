"""Benchmark BAdam against AdamW, LoRA and the authors' `badam` package on a random-init Llama.

    python benchmarks/bench.py [--shape cpu|tiny|llama3-8b] [--steps N] [--methods badam,adamw,lora,reference]
                               [--out DIR] [--batch B --seq S] [--gradient-checkpointing]

Every method trains the same model (same seed, same random token batches) for the same number of steps, each
in a process of its own (badam_hf.tools.harness.run_isolated), so peak-memory numbers do not leak between methods.
Per method it measures: peak memory (CPU: peak RSS; GPU: torch.cuda.max_memory_allocated), the bytes held in
gradients, fp32 master copies and optimizer state (counted tensor by tensor at the end of the inner optimizer
step, when all of them exist at once), and forward / backward / optimizer-step time per step.

BAdam switches block every step (K=1, ascending) and the timed steps cover whole block-epochs, so its backward
time is averaged over every depth of the active layer. Results go to benchmarks/results/<shape>/ as
results.json, results.md and memory_time.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time

SHAPES = {
    # Sized for a 2-core CPU machine: ~160M parameters, a few minutes for all four methods.
    "cpu": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                num_key_value_heads=8, vocab_size=32000, batch=2, seq=128),
    # For the smoke test: seconds.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, batch=2, seq=16),
    # Llama 3 8B, the paper's Table 2 setting (batch 2, seq 728, gradient checkpointing): needs a GPU.
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, batch=2, seq=728, gradient_checkpointing=True),
}
METHODS = ("badam", "adamw", "lora", "reference", "badam_k100", "reference_k100", "badam_ratio", "badam_lisa",
           "badam_bread")
# The block family's other members, as BlockOptimizer settings (K=1 like `badam`).
FAMILY = {
    "badam_ratio": dict(mode="ratio", update_ratio=0.05, mask_mode="adjacent"),
    "badam_lisa": dict(mode="lisa", lisa_layers=2),
    "badam_bread": dict(switch_mode="ascending", inactive_update="sgd", inactive_scope="above"),
}
LABELS = {
    "badam": "BAdam (badam_hf)",
    "adamw": "AdamW (fp32 + bf16 autocast)",
    "lora": "LoRA r=8 q,v (peft)",
    "reference": "BAdam (authors' badam pkg)",
    "badam_k100": "BAdam K=100 (badam_hf)",
    "reference_k100": "BAdam K=100 (authors' badam pkg)",
    "badam_ratio": "BAdam ratio 5% adjacent (badam_hf)",
    "badam_lisa": "LISA 2 layers + emb/head (badam_hf)",
    "badam_bread": "BAdam + BREAD sgd above (badam_hf)",
}
PHASE_STEPS = 2  # steps after the timed ones, counted tensor by tensor (LiveTensorBytes), phase by phase
# glibc's malloc raises its mmap threshold after big frees, so later tensors come from a heap that fragments and
# peak RSS drifts by +-10% between identical runs. Pinning it (every method alike) makes freed tensors go back to
# the OS, so RSS tracks the tensors a method holds; `--glibc-default` measures with glibc's own heuristics.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
WARMUP_STEPS = 1  # untimed steps first (allocator / kernel warm-up); BAdam's block-epoch alignment is kept


# --- memory ------------------------------------------------------------------------------------------


# The process-memory probes are the harness's: VmRSS now, and VmHWM reset per phase.
# Each method runs in a process of its own (the harness's run_isolated), so its memory is its own.
from badam_hf.tools.harness import IsolatedRunFailed, peak_rss_bytes, reset_peak_rss, rss_bytes, run_isolated  # noqa: E402


def tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def count_training_bytes(model, optimizer) -> dict:
    """Independent count of what training holds beyond the forward pass, read off the tensors themselves.

    `optimizer` is the optimizer that actually updates tensors (for BAdam: its inner AdamW). Tensors it updates
    that are not model parameters are fp32 master copies. Optimizer state is split into moments (tensors with
    one entry per parameter entry) and per-tensor scalars (AdamW's `step`)."""
    import torch

    model_params = {id(p): p for p in model.parameters()}
    updated = [p for g in optimizer.param_groups for p in g["params"]]
    masters = [t for t in updated if id(t) not in model_params]
    moments = scalars = 0
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                if v.dim() == 0:
                    scalars += tensor_bytes(v)
                else:
                    moments += tensor_bytes(v)
    grads = sum(tensor_bytes(t.grad) for t in list(model_params.values()) + masters if t.grad is not None)
    return {
        "weights": sum(tensor_bytes(p) for p in model_params.values()),
        "grads": grads,
        "masters": sum(tensor_bytes(t) for t in masters),
        "moments": moments,
        "step_scalars": scalars,
        "updated_numel": sum(t.numel() for t in updated),
    }


# --- model, data, methods ----------------------------------------------------------------------------


def build_model(shape: dict, dtype, seed: int, device=None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"], max_position_embeddings=max(2048, shape["seq"]),
        tie_word_embeddings=False, use_cache=False,
    )
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in the target dtype: no fp32 copy of an 8B model
    try:
        with torch.device(device or "cpu"):  # on the GPU directly: an 8B model is never staged in host memory
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model


def make_batches(shape: dict, n: int, seed: int, device):
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    return [
        torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=g).to(device)
        for _ in range(n)
    ]


def switch_every_of(method: str) -> int:
    """K of a BAdam method: `badam` / `reference` switch every step (K=1), `*_k100` every 100 steps."""
    return int(method.rsplit("_k", 1)[1]) if "_k" in method else 1


def setup_method(method: str, model, num_layers: int, lr: float = 1e-5):
    """Returns (model, optimizer to step, optimizer whose tensors are counted, autocast dtype or None, info)."""
    import torch

    info = {}
    K = switch_every_of(method)
    method = method.rsplit("_k", 1)[0]
    if method == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        return model, opt, opt, torch.bfloat16, info
    if method == "badam":
        from badam_hf.core.optimizer import BlockOptimizer

        opt = BlockOptimizer(model, lr=lr, switch_every=K, switch_mode="ascending", granularity="layer")
        info["num_blocks"] = opt.num_blocks
        info["switch_every"] = K
        return model, opt, opt.inner, None, info
    if method in FAMILY:
        from badam_hf.core.optimizer import BlockOptimizer

        opt = BlockOptimizer(model, lr=lr, switch_every=K, granularity="layer", **FAMILY[method])
        if method == "badam_bread":  # block-epoch aligned like `badam`
            info["num_blocks"] = opt.num_blocks
            info["switch_every"] = K
        return model, opt, opt.inner, None, info
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        from badam_hf.tools.harness import LORA_TARGETS

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS["lora"], task_type="CAUSAL_LM"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        return model, opt, opt, None, info
    if method == "reference":
        from badam import BlockOptimizer as RefBlockOptimizer

        base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        opt = RefBlockOptimizer(
            base, list(model.named_parameters()), switch_block_every=K, switch_mode="ascending",
            block_prefix_list=[[f"model.layers.{i}."] for i in range(num_layers)], verbose=0,
        )
        info["num_blocks"] = num_layers
        info["switch_every"] = K
        return model, opt, base, None, info
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


# --- live tensors, phase by phase -----------------------------------------------------------------------


def live_accounting(model, opt, counted, batches, autocast_dtype=None) -> dict:
    """A few more steps with every tensor counted (badam_hf.tools.live_memory): the most bytes alive in each
    phase (forward, backward, and inside the optimizer step: gradients to masters, inner step, write-back and
    switch), above the weights; the activations (growth during the forward); what was alive at the peak."""
    import contextlib

    import torch

    from badam_hf.tools.live_memory import LiveTensorBytes, format_snapshot, storage_key

    model_ids = {id(p) for p in model.parameters()}

    def labeler():
        out = {}
        for p in model.parameters():
            out[storage_key(p)] = "weights"
            if p.grad is not None:
                out[storage_key(p.grad)] = f"{str(p.grad.dtype).replace('torch.', '')} grads"
        for g in counted.param_groups:
            for t in g["params"]:
                if id(t) not in model_ids:
                    out[storage_key(t)] = "fp32 masters"
                    if t.grad is not None:
                        out[storage_key(t.grad)] = "fp32 master grads"
        for st in counted.state.values():
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim():
                    out[storage_key(v)] = f"moments ({k})"
        return out

    live = LiveTensorBytes(labeler)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    live.track(model.parameters(), "weights")
    # What already exists before the counted steps: the active block's masters (and moments, for K > 1).
    live.track([t for g in counted.param_groups for t in g["params"] if id(t) not in model_ids], "fp32 masters")
    live.track([v for st in counted.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()], "moments")
    handles = [
        opt.register_step_pre_hook(lambda *a: live.set_phase("grads to masters")),
        counted.register_step_pre_hook(lambda *a: live.set_phase("inner step")),
        counted.register_step_post_hook(lambda *a: live.set_phase("write back, switch")),
    ]
    autocast = (lambda: torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=autocast_dtype)) \
        if autocast_dtype is not None else contextlib.nullcontext
    activations = 0
    try:
        with live:
            for ids in batches:
                before = live.live_bytes()
                with live.phase("forward"), autocast():
                    loss = model(input_ids=ids, labels=ids).loss
                activations = max(activations, live.peaks["forward"] - before)
                with live.phase("backward"):
                    loss.backward()
                    del loss
                with live.phase("optimizer step"):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                live.set_phase("between steps")
    finally:
        for h in handles:
            h.remove()
    return {
        "weights_bytes": weights,
        "peak_bytes": live.peak,
        "peak_phase": live.peak_phase,
        "activations_bytes": activations,
        "phases_above_weights": {k: v - weights for k, v in live.peaks.items() if k != "setup"},
        "at_peak": [[p, w, b] for p, w, b in format_snapshot(live.peak_snapshot, 10) if w != "weights"],
    }


# --- one method, in its own process ----------------------------------------------------------------------


def worker(args) -> dict:
    """One method's run. On a CPU without bf16 arithmetic the bf16 products run in fp32 (for every method alike:
    badam_hf.integrations.cpu_compute); the result says so."""
    from badam_hf.integrations.cpu_compute import fp32_linear_compute

    with fp32_linear_compute() as on:
        result = _worker(args)
    result["cpu_fp32_linear"] = bool(on)
    return result


def _worker(args) -> dict:
    import torch

    shape = dict(SHAPES[args.shape])
    if args.batch:
        shape["batch"] = args.batch
    if args.seq:
        shape["seq"] = args.seq
    method = args.worker
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    # Import everything any method needs before the baseline, so import sizes do not count as training memory.
    import peft  # noqa: F401
    import transformers.trainer  # noqa: F401  (badam_hf reads HF's weight-decay rule from it)
    import badam_hf.core.optimizer  # noqa: F401
    try:
        import badam  # noqa: F401
    except ImportError:
        pass
    gc.collect()
    rss_before_model = rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    dtype = torch.float32 if method == "adamw" else torch.bfloat16
    model = build_model(shape, dtype, args.seed, device)
    model.train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batches = make_batches(shape, args.steps + WARMUP_STEPS, args.seed, device)
    gc.collect()
    rss_after_model = rss_bytes()
    gpu_after_model = torch.cuda.memory_allocated() if cuda else 0

    model, opt, counted, autocast_dtype, info = setup_method(method, model, shape["num_hidden_layers"])
    if args.gradient_checkpointing and method == "lora":
        model.enable_input_require_grads()

    snapshots = []

    def snapshot(*_):  # called at the end of each inner optimizer step: grads, masters and state all exist
        snap = count_training_bytes(model, counted)
        if method.startswith("badam"):
            snap["own_memory_bytes"] = opt.memory_bytes()
            snap["active_block"] = opt.active_block_name
        snapshots.append(snap)

    counted.register_step_post_hook(snapshot)

    def run_step(input_ids):
        sync()
        t0 = time.perf_counter()
        if autocast_dtype is not None:
            with torch.autocast(device.type, dtype=autocast_dtype):
                loss = model(input_ids=input_ids, labels=input_ids).loss
        else:
            loss = model(input_ids=input_ids, labels=input_ids).loss
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        return loss.item(), t1 - t0, t2 - t1, t3 - t2

    # Warm-up steps, then (K=1) enough extra untimed steps to start the timed window at block 0 again.
    D = info.get("num_blocks")
    warm = WARMUP_STEPS + ((-WARMUP_STEPS) % D if D and info.get("switch_every") == 1 else 0)
    warm_batches = batches[:1] * warm
    for b in warm_batches:
        run_step(b)
    snapshots.clear()
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    peak_reset = reset_peak_rss() if not cuda else True

    load_before = os.getloadavg()
    fwd, bwd, stp, losses = [], [], [], []
    wall0 = time.perf_counter()
    for b in batches[WARMUP_STEPS:]:
        loss, f, bk, s = run_step(b)
        losses.append(loss)
        fwd.append(f)
        bwd.append(bk)
        stp.append(s)
    wall = time.perf_counter() - wall0

    load_after = os.getloadavg()

    if cuda:
        peak = torch.cuda.max_memory_allocated()
        mem = {"peak_bytes": peak, "model_bytes_after_build": gpu_after_model, "kind": "torch.cuda.max_memory_allocated"}
    else:
        peak = peak_rss_bytes()
        mem = {
            "peak_bytes": peak - rss_before_model,  # model + training, above the process's RSS before the build
            "peak_rss_bytes": peak,
            "growth_after_build_bytes": peak - rss_after_model,
            "rss_before_model_bytes": rss_before_model,
            "rss_after_model_bytes": rss_after_model,
            "peak_reset_after_warmup": peak_reset,
            "kind": "VmHWM - VmRSS before the model was built",
        }
    live = live_accounting(model, opt, counted, batches[WARMUP_STEPS:WARMUP_STEPS + PHASE_STEPS], autocast_dtype)
    full_bwd = []
    if method.startswith("badam"):
        # The paper's reference point for BAdam's backward: a full backward of the same bf16 model (every
        # parameter requires grad, no truncation), timed after the memory readings above.
        opt.truncation.cut_layer = None
        for p_ in model.parameters():
            p_.requires_grad_(True)
        for b in batches[WARMUP_STEPS:WARMUP_STEPS + min(len(batches) - WARMUP_STEPS, 3)]:
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=b, labels=b).loss
            sync()
            t0 = time.perf_counter()
            loss.backward()
            sync()
            full_bwd.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)

    best = max(snapshots, key=lambda s: s["grads"] + s["masters"] + s["moments"] + s["step_scalars"])
    tokens = shape["batch"] * shape["seq"]
    step_time = [a + b + c for a, b, c in zip(fwd, bwd, stp)]
    mean = lambda xs: sum(xs) / len(xs)
    return {
        "method": method,
        "label": LABELS[method],
        "device": "cuda" if cuda else "cpu",
        "steps": len(fwd),
        "warmup_steps": warm,
        "num_blocks": D,
        "total_params": sum(p.numel() for p in model.parameters()),
        "memory": mem,
        "bytes": best,
        "time": {
            "forward_s": mean(fwd), "backward_s": mean(bwd), "optimizer_s": mean(stp), "step_s": mean(step_time),
            "per_step_backward_s": bwd, "per_step_forward_s": fwd, "per_step_optimizer_s": stp,
            "wall_s": wall, "tokens_per_s": tokens * len(fwd) / sum(step_time),
            "median_forward_s": statistics.median(fwd), "median_optimizer_s": statistics.median(stp),
            "full_backward_same_dtype_s": mean(full_bwd) if full_bwd else None,
        },
        "loadavg_1min_before_after": [load_before[0], load_after[0]],
        "live": live,
        "losses": losses,
        **{k: v for k, v in info.items() if k != "num_blocks"},
    }


# --- driver ------------------------------------------------------------------------------------------------


def expected_backward_ratio(D: int) -> float:
    """Paper: a backward through the top D-i+1 layers only, averaged over the D active layers of a block-epoch."""
    return D * (D + 1) / (2 * D * D)


def fmt_gb(b: float) -> str:
    return f"{b / 1e9:.3f}"


def markdown(results: dict, meta: dict) -> str:
    rows = results["methods"]
    ref = rows.get("adamw")
    lines = [
        f"# BAdam benchmark: shape `{meta['shape']}`",
        "",
        f"Machine: {meta['machine']}. Model: random-init Llama, {meta['total_params'] / 1e6:.1f}M parameters, "
        f"D={meta['num_layers']} layers, batch {meta['batch']} x seq {meta['seq']}, {meta['steps']} timed steps per "
        f"method{', gradient checkpointing' if meta['gradient_checkpointing'] else ''}. Each method ran in its own "
        f"process. Peak memory: {meta['memory_kind']} (malloc: {meta.get('malloc', 'glibc default')})."
        + (" This CPU lacks bf16 arithmetic: every method's bf16 products ran in fp32 (badam_hf.integrations."
           "cpu_compute)." if meta.get("cpu_fp32_linear") else ""),
        "",
        "| method | peak mem GB | mem / AdamW | grads+masters+opt-state GB | trained params | fwd s | bwd s | "
        "bwd / AdamW | opt step s | step s | step / AdamW | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        b, t = r["bytes"], r["time"]
        held = b["grads"] + b["masters"] + b["moments"] + b["step_scalars"]
        ratio = lambda x, y: f"{x / y:.3f}" if ref else "-"
        lines.append(
            f"| {r['label']} | {fmt_gb(r['memory']['peak_bytes'])} | "
            f"{ratio(r['memory']['peak_bytes'], ref['memory']['peak_bytes']) if ref else '-'} | {fmt_gb(held)} | "
            f"{b['updated_numel'] / 1e6:.2f}M | {t['forward_s']:.3f} | {t['backward_s']:.3f} | "
            f"{ratio(t['backward_s'], ref['time']['backward_s']) if ref else '-'} | {t['optimizer_s']:.3f} | "
            f"{t['step_s']:.3f} | {ratio(t['step_s'], ref['time']['step_s']) if ref else '-'} | {t['tokens_per_s']:.0f} |"
        )
    for m, rc in meta.get("failed", {}).items():
        lines.append(f"| {LABELS[m]} | failed (worker exit code {rc}, e.g. out of memory) | | | | | | | | | | |")
    loads = {m: r.get("loadavg_1min_before_after") for m, r in rows.items()}
    lines += ["", "1-minute load average before/after each method's timed steps (timings are only comparable on an "
              "otherwise idle machine): " + ", ".join(f"{m} {a:.1f}/{b:.1f}" for m, (a, b) in loads.items() if a is not None)]
    lines += ["", "## Bytes per method (at the end of an optimizer step, when all of them exist)", "",
              "| method | weights | grads | fp32 masters | moments | step scalars |", "|---|---|---|---|---|---|"]
    for m, r in rows.items():
        b = r["bytes"]
        lines.append(f"| {r['label']} | {b['weights']:,} | {b['grads']:,} | {b['masters']:,} | {b['moments']:,} | "
                     f"{b['step_scalars']:,} |")
    lines += live_tables(rows)
    lines += ["", "## Paper's expectations next to the measurements", ""]
    D = meta["num_layers"]
    if "badam" in rows:
        r = rows["badam"]
        b = r["bytes"]
        n = b["updated_numel"]
        held = b["grads"] + b["masters"] + b["moments"]
        own = b.get("own_memory_bytes", {})
        lines.append(
            f"- BAdam grads + fp32 master + Adam moments = 16 bytes x active-block params: expected "
            f"{16 * n:,} (active block {n:,} params, about M/D = {meta['total_params'] / D:,.0f}); measured {held:,} "
            f"({held / n:.2f} bytes/param; plus {b['step_scalars']:,} bytes of AdamW step counters). "
            f"BlockOptimizer.memory_bytes() says {sum(own.values()):,} "
            f"({'agrees' if sum(own.values()) == held + b['step_scalars'] else 'DISAGREES'} with the independent count)."
        )
        exp = expected_backward_ratio(D)
        if ref:
            got = r["time"]["backward_s"] / ref["time"]["backward_s"]
            lines.append(
                f"- BAdam backward / full backward: expected about D(D+1)/(2D^2) = {exp:.3f} at D={D} (the backward "
                f"only goes down to the active layer; it still crosses the LM head); measured {got:.3f} against "
                f"AdamW's (different precision: AdamW runs bf16 autocast over fp32 weights)."
            )
            got_s = r["time"]["optimizer_s"] / ref["time"]["optimizer_s"]
            lines.append(
                f"- BAdam optimizer step faster than AdamW's (it updates ~1/D of the parameters): measured "
                f"{r['time']['optimizer_s']:.4f} s vs {ref['time']['optimizer_s']:.4f} s (ratio {got_s:.3f}; "
                f"{'as expected' if got_s < 1 else 'NOT met'})."
            )
        full = r["time"].get("full_backward_same_dtype_s")
        if full:
            got = r["time"]["backward_s"] / full
            lines.append(
                f"- BAdam backward / full backward of the same bf16 model (all parameters trainable, timed in the same "
                f"process): expected about {exp:.3f}; measured {r['time']['backward_s']:.3f} s / {full:.3f} s = "
                f"{got:.3f}. (The formula counts layers only; the full backward also computes the weight gradients "
                f"of the embedding and LM head, {1 - n * D / meta['total_params']:.0%} of the parameters here, which "
                f"BAdam's does not.)"
            )
        for ours, theirs in (("badam", "reference"), ("badam_k100", "reference_k100")):
            if ours in rows and theirs in rows:
                a, q = rows[ours], rows[theirs]
                mr = a["memory"]["peak_bytes"] / q["memory"]["peak_bytes"]
                gr = training_growth(a) / training_growth(q)
                sr = a["time"]["step_s"] / q["time"]["step_s"]
                lw = a["live"]["weights_bytes"]
                lr_ = (a["live"]["peak_bytes"] - lw) / (q["live"]["peak_bytes"] - lw)
                lines.append(
                    f"- Less memory than the authors' package at K={switch_every_of(ours)} (target: <= 0.95x theirs, "
                    f"measured in this run): peak growth after the model was built, ours/theirs {gr:.3f} "
                    f"({'met' if gr <= 0.95 else 'NOT met'}; {training_growth(a) / 2**30:.3f} vs "
                    f"{training_growth(q) / 2**30:.3f} GiB); live tensors above the weights {lr_:.3f}; whole peak "
                    f"(weights included) {mr:.3f}; step time {sr:.3f}."
                )
        lines.append(
            f"- BAdam's per-step backward times over one block-epoch (active layer 0 .. {D - 1}, ascending): "
            + ", ".join(f"{x:.3f}" for x in r["time"]["per_step_backward_s"][:D])
        )
    lines.append("")
    return "\n".join(lines)


def training_growth(r: dict) -> int:
    """Peak memory above what the built model held: CPU peak RSS growth, GPU max allocated minus the model."""
    m = r["memory"]
    if "growth_after_build_bytes" in m:
        return m["growth_after_build_bytes"]
    return m["peak_bytes"] - m["model_bytes_after_build"]


PHASES = ("forward", "backward", "grads to masters", "inner step", "write back, switch", "optimizer step")


def live_tables(rows: dict) -> list[str]:
    """The phase-by-phase live-tensor accounting (MiB above the weights) and what was alive at each peak."""
    with_live = {m: r for m, r in rows.items() if r.get("live")}
    if not with_live:
        return []
    mib = lambda b: f"{b / 2**20:.1f}"
    lines = ["", f"## Live tensor bytes by phase ({PHASE_STEPS} more steps, every tensor counted; MiB above the "
             "weights)", "", "Counted by `badam_hf.tools.live_memory.LiveTensorBytes` (a TorchDispatchMode: every "
             "storage an op makes, until it is freed), so allocator caching and fragmentation do not enter. "
             "\"optimizer step\" is the part of the step outside the inner optimizer (for BAdam the write-back "
             "and zero_grad).", "",
             "| method | " + " | ".join(PHASES) + " | peak | activations |", "|---" * (len(PHASES) + 3) + "|"]
    for m, r in with_live.items():
        ph = r["live"]["phases_above_weights"]
        cells = [mib(ph[k]) if k in ph else "-" for k in PHASES]
        peak = r["live"]["peak_bytes"] - r["live"]["weights_bytes"]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {mib(peak)} ({r['live']['peak_phase']}) | "
                     f"{mib(r['live']['activations_bytes'])} |")
    for m, r in with_live.items():
        if m.startswith("badam"):
            lv, n = r["live"], r["bytes"]["updated_numel"]
            bound = lv["weights_bytes"] + 16 * n + lv["activations_bytes"]
            lines.append("")
            lines.append(f"- {r['label']}: live peak {lv['peak_bytes']:,} bytes vs weights + 16 bytes x active-block "
                         f"params + activations = {bound:,} (ratio {lv['peak_bytes'] / bound:.3f}; target <= 1.05).")
    lines += ["", "What was alive at each method's live peak (besides the weights; MiB, by phase made in and kind):", ""]
    for m, r in with_live.items():
        top = ", ".join(f"{w} [{p}] {mib(b)}" for p, w, b in r["live"]["at_peak"][:6])
        lines.append(f"- {r['label']}: {top}")
    return lines


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["methods"]
    labels = [r["label"].replace(" (", "\n(") for r in rows.values()]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    axes[0].bar(labels, [r["memory"]["peak_bytes"] / 1e9 for r in rows.values()], color="tab:blue")
    axes[0].set_title("peak memory (GB)")
    held = [(r["bytes"]["grads"] + r["bytes"]["masters"] + r["bytes"]["moments"]) / 1e9 for r in rows.values()]
    axes[1].bar(labels, held, color="tab:orange")
    axes[1].set_title("grads + fp32 masters + moments (GB)")
    bottom = [0.0] * len(rows)
    for key, color in (("forward_s", "tab:green"), ("backward_s", "tab:red"), ("optimizer_s", "tab:purple")):
        vals = [r["time"][key] for r in rows.values()]
        axes[2].bar(labels, vals, bottom=bottom, color=color, label=key[:-2])
        bottom = [a + b for a, b in zip(bottom, vals)]
    axes[2].set_title("time per step (s)")
    axes[2].legend()
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"BAdam benchmark, shape {results['meta']['shape']} ({results['meta']['machine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_description(cuda_name: str | None) -> str:
    if cuda_name:
        return f"GPU {cuda_name}"
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU"


@dataclasses.dataclass
class BenchSettings:
    """One bench run (the command line's options); `worker` names the method a worker process measures."""

    shape: str = "cpu"
    steps: int | None = None  # default: one block-epoch (D steps)
    methods: str = ",".join(METHODS)
    out: str | None = None
    batch: int | None = None
    seq: int | None = None
    gradient_checkpointing: bool | None = None  # default: the shape's
    cpu: bool = False
    seed: int = 0
    glibc_default: bool = False
    worker: str | None = None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="cpu")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per method (default: one block-epoch, D = number of layers)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<shape>)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--glibc-default", action="store_true",
                   help="leave glibc's dynamic mmap threshold alone in the workers (noisier peak RSS)")
    args = BenchSettings(**vars(p.parse_args(argv)))
    if not args.glibc_default:
        os.environ.update(MALLOC_ENV)  # read by each worker process's malloc when it starts

    shape = SHAPES[args.shape]
    import torch

    if args.shape == "llama3-8b" and (args.cpu or not torch.cuda.is_available()):
        # 16 GB of bf16 weights (plus AdamW's 128 GB of states) is not a CPU benchmark: fail now, not after hours.
        p.error("--shape llama3-8b needs a CUDA GPU (none is available here, or --cpu was given); "
                "use --shape cpu or --shape tiny on this machine")
    D = shape["num_hidden_layers"]
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = bool(shape.get("gradient_checkpointing", False))
    if args.steps is None:
        args.steps = D
    if args.steps < 1:
        p.error("--steps must be >= 1")

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    if "reference" in methods:
        try:
            import badam  # noqa: F401
        except ImportError:
            print("the authors' `badam` package is not importable: skipping method 'reference'", file=sys.stderr)
            methods.remove("reference")
    if "badam" in methods and args.steps % D:
        print(f"note: --steps {args.steps} is not a multiple of D={D}; BAdam's backward time is then not averaged "
              "over whole block-epochs", file=sys.stderr)

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", args.shape)
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()
    rows, failed = {}, {}
    for m in methods:
        t0 = time.perf_counter()
        print(f"[bench] {m}: running ...", flush=True)
        try:
            rows[m] = run_isolated(worker, dataclasses.replace(args, worker=m))
        except IsolatedRunFailed as e:
            # e.g. AdamW running out of GPU memory at --shape llama3-8b: report it and go on with the others.
            print(f"[bench] {m}: {e}", file=sys.stderr)
            failed[m] = e.exitcode
            continue
        print(f"[bench] {m}: done in {time.perf_counter() - t0:.1f} s", flush=True)

    if not rows:
        print("[bench] every method failed", file=sys.stderr)
        return 1
    import torch

    cuda_name = torch.cuda.get_device_name(0) if rows and next(iter(rows.values()))["device"] == "cuda" else None
    first = next(iter(rows.values()))
    meta = {
        "shape": args.shape, "machine": machine_description(cuda_name), "num_layers": D,
        "total_params": max(r["total_params"] for r in rows.values()),
        "batch": args.batch or shape["batch"], "seq": args.seq or shape["seq"], "steps": args.steps,
        "gradient_checkpointing": args.gradient_checkpointing, "memory_kind": first["memory"]["kind"],
        "torch": torch.__version__, "total_runtime_s": time.perf_counter() - t_start,
        "expected_badam_backward_ratio": expected_backward_ratio(D), "failed": failed,
        "malloc": "glibc default" if args.glibc_default else " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()),
        "cpu_fp32_linear": any(r.get("cpu_fp32_linear") for r in rows.values()),
    }
    if "adamw" in rows:
        ref = rows["adamw"]
        for r in rows.values():
            r["ratios_to_adamw"] = {
                "memory": r["memory"]["peak_bytes"] / ref["memory"]["peak_bytes"],
                "backward_time": r["time"]["backward_s"] / ref["time"]["backward_s"],
                "optimizer_time": r["time"]["optimizer_s"] / ref["time"]["optimizer_s"],
                "step_time": r["time"]["step_s"] / ref["time"]["step_s"],
            }
    results = {"meta": meta, "methods": rows}
    md = markdown(results, meta)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    plot(results, os.path.join(out, "memory_time.png"))
    print(md)
    print(f"[bench] total runtime {meta['total_runtime_s']:.1f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
