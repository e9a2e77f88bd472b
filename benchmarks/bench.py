"""Benchmark BAdam against AdamW, LoRA and the authors' `badam` package on a random-init Llama.

    python benchmarks/bench.py [--shape cpu|tiny|llama3-8b] [--steps N] [--methods badam,adamw,lora,reference]
                               [--out DIR] [--batch B --seq S] [--gradient-checkpointing] [--no-kernel-count]
    python benchmarks/bench.py --methods rounding   # optimizer step: default vs nearest vs the authors', K=1, 4

Every method trains the same model (same seed, same random token batches) for the same number of steps, each
in a process of its own (badam_hf.tools.harness.run_isolated), so peak-memory numbers do not leak between methods.
Per method it measures: peak memory (CPU: peak RSS; GPU: torch.cuda.max_memory_allocated), the bytes held in
gradients, fp32 master copies and optimizer state (counted tensor by tensor at the end of the inner optimizer
step, when all of them exist at once), and forward / backward / optimizer-step time per step.

The report also counts the device kernels one optimizer step launches over a Llama 3-8B decoder layer
(badam_hf.tools.kernel_count, on the meta device: no GPU needed) beside torch's fused AdamW.

BAdam switches block every step (K=1, ascending) and the timed steps cover whole block-epochs, so its backward
time is averaged over every depth of the active layer. Results go to benchmarks/results/<shape>/ as
results.json, results.md and memory_time.png.

The file is a table of methods (METHOD_SPECS) and one measure_* function per measurement, composed by `worker`.
The report states the paper's expectations next to the measurements; whether they hold is for tests
(tests/test_bench_smoke.py) and for the reader, not for the report.
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
from typing import Any

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


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One method of the bench: which optimizer trains the model and with which settings."""

    label: str
    # "block": this package's BlockOptimizer; "reference": the authors' `badam` package; "adamw"; "lora" (peft)
    optimizer: str
    switch_every: int = 1  # K of the block methods
    block_settings: dict = dataclasses.field(default_factory=dict)  # further BlockOptimizer keywords

    @property
    def layerwise(self) -> bool:
        """One layer at a time (BAdam's layer mode, ours or the authors'): D blocks, a block-epoch of D x K steps."""
        return self.optimizer in ("block", "reference") and "mode" not in self.block_settings

    @property
    def block_epoch_aligned(self) -> bool:
        """The timed window starts at block 0 and covers whole block-epochs: the backward's cost depends on how
        deep the active layer is, so K=1 runs are timed over every depth."""
        return self.layerwise and self.switch_every == 1


ASCENDING = {"switch_mode": "ascending"}
METHOD_SPECS = {
    "badam": MethodSpec("BAdam (badam_hf)", "block", block_settings=ASCENDING),
    "adamw": MethodSpec("AdamW (fp32 + bf16 autocast)", "adamw"),
    "lora": MethodSpec("LoRA r=8 q,v (peft)", "lora"),
    "reference": MethodSpec("BAdam (authors' badam pkg)", "reference"),
    # K=100: the timed steps stay in block 0, whose master and moments live through every forward and backward
    "badam_k100": MethodSpec("BAdam K=100 (badam_hf)", "block", 100, ASCENDING),
    "reference_k100": MethodSpec("BAdam K=100 (authors' badam pkg)", "reference", 100),
    # the block family's other members, K=1 like `badam`
    "badam_ratio": MethodSpec("BAdam ratio 5% adjacent (badam_hf)", "block",
                              block_settings=dict(mode="ratio", update_ratio=0.05, mask_mode="adjacent")),
    "badam_lisa": MethodSpec("LISA 2 layers + emb/head (badam_hf)", "block", block_settings=dict(mode="lisa", lisa_layers=2)),
    "badam_bread": MethodSpec("BAdam + BREAD sgd above (badam_hf)", "block",
                              block_settings=dict(ASCENDING, inactive_update="sgd", inactive_scope="above")),
    # the rounding at a block's end: the default (stochastic) against nearest and the authors' package
    "badam_nearest": MethodSpec("BAdam nearest (badam_hf)", "block", block_settings=dict(ASCENDING, switch_rounding="nearest")),
    "reference_k4": MethodSpec("BAdam K=4 (authors' badam pkg)", "reference", 4),
    "badam_k4": MethodSpec("BAdam K=4 (badam_hf)", "block", 4, ASCENDING),
    "badam_k4_nearest": MethodSpec("BAdam K=4 nearest (badam_hf)", "block", 4,
                                   dict(ASCENDING, switch_rounding="nearest")),
}
# `--methods rounding`: the optimizer step of the default rounding against nearest and the authors', K=1 and K=4
# (K -> the authors', badam_hf's default, badam_hf nearest; `step_table` reads the rows in this order).
ROUNDING_ROWS = ((1, ("reference", "badam", "badam_nearest")), (4, ("reference_k4", "badam_k4", "badam_k4_nearest")))
GROUPS = {"rounding": ",".join(m for _, methods in ROUNDING_ROWS for m in methods)}
ROUNDING_ROUNDS = 3  # the rounding group's default --rounds: its ratios are a few percent apart
METHODS = tuple(METHOD_SPECS)
LABELS = {name: spec.label for name, spec in METHOD_SPECS.items()}
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


def setup_method(spec: MethodSpec, model, num_layers: int, lr: float = 1e-5):
    """Returns (model, optimizer to step, optimizer whose tensors are counted, autocast dtype or None)."""
    import torch

    if spec.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        return model, opt, opt, torch.bfloat16
    if spec.optimizer == "block":
        from badam_hf.core.optimizer import BlockOptimizer

        opt = BlockOptimizer(model, lr=lr, switch_every=spec.switch_every, granularity="layer", **spec.block_settings)
        return model, opt, opt.inner, None
    if spec.optimizer == "lora":
        from peft import LoraConfig, get_peft_model

        from badam_hf.tools.harness import LORA_TARGETS

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS["lora"], task_type="CAUSAL_LM"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        return model, opt, opt, None
    if spec.optimizer == "reference":
        from badam import BlockOptimizer as RefBlockOptimizer

        base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        opt = RefBlockOptimizer(
            base, list(model.named_parameters()), switch_block_every=spec.switch_every, switch_mode="ascending",
            block_prefix_list=[[f"model.layers.{i}."] for i in range(num_layers)], verbose=0,
        )
        return model, opt, base, None
    raise ValueError(f"unknown optimizer {spec.optimizer!r} in {spec}")


# --- live tensors, phase by phase -----------------------------------------------------------------------


def measure_live_tensors(model, opt, counted, batches, autocast_dtype=None) -> dict:
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


@dataclasses.dataclass
class Run:
    """One method's training set-up in its worker process: what the measure_* functions share."""

    spec: MethodSpec
    model: Any
    opt: Any  # the optimizer stepped
    counted: Any  # the optimizer that updates tensors (BAdam: its inner AdamW), whose tensors are counted
    autocast_dtype: Any
    batches: list
    device: Any
    num_layers: int
    tokens_per_step: int
    memory_after_build: dict  # measure_baseline's reading with the model and batches built, before the optimizer
    snapshots: list = dataclasses.field(default_factory=list)  # bytes held, at the end of each inner step

    def sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize()

    def step(self, input_ids) -> tuple[float, float, float, float]:
        """One training step: (loss, forward s, backward s, optimizer step s)."""
        import contextlib

        import torch

        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                    else contextlib.nullcontext())
        self.sync()
        t0 = time.perf_counter()
        with autocast:
            loss = self.model(input_ids=input_ids, labels=input_ids).loss
        self.sync()
        t1 = time.perf_counter()
        loss.backward()
        self.sync()
        t2 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sync()
        return loss.item(), t1 - t0, t2 - t1, time.perf_counter() - t2


def worker(args) -> dict:
    """One method's run, in its own process. On a CPU without bf16 arithmetic the bf16 products run in fp32 (for
    every method alike: badam_hf.integrations.cpu_compute); the result says so."""
    from badam_hf.integrations.cpu_compute import fp32_linear_compute

    spec = METHOD_SPECS[args.worker]
    _import_everything()
    with fp32_linear_compute() as on:
        baseline = measure_baseline(args)
        run = build_run(args, spec)
        warm = warm_up(run)
        peak_reset = reset_peak(run)
        steps = measure_steps(run)
        memory = measure_peak_memory(run, baseline, peak_reset)
        live = measure_live_tensors(run.model, run.opt, run.counted,
                                    run.batches[WARMUP_STEPS:WARMUP_STEPS + PHASE_STEPS], run.autocast_dtype)
        # timed after the memory readings above: it makes every parameter trainable
        full_backward = measure_full_backward(run) if spec.optimizer == "block" else None
    steps["time"]["full_backward_same_dtype_s"] = full_backward
    result = {
        "method": args.worker,
        "label": spec.label,
        "device": run.device.type,
        "warmup_steps": warm,
        "num_blocks": run.num_layers if spec.layerwise else None,
        "total_params": sum(p.numel() for p in run.model.parameters()),
        "memory": memory,
        # the step when gradients, masters and moments together were largest
        "bytes": max(run.snapshots, key=lambda s: s["grads"] + s["masters"] + s["moments"] + s["step_scalars"]),
        "live": live,
        "cpu_fp32_linear": bool(on),
        **steps,
    }
    if spec.layerwise:
        result["switch_every"] = spec.switch_every
    return result


def measure_baseline(args) -> dict:
    """The process's memory now (CPU: RSS; GPU: allocated bytes), after a garbage collection."""
    import torch

    gc.collect()
    if torch.cuda.is_available() and not args.cpu:
        return {"rss": 0, "gpu": torch.cuda.memory_allocated()}
    return {"rss": rss_bytes(), "gpu": 0}


def build_run(args, spec: MethodSpec) -> Run:
    """The model (the shape's random-init Llama: fp32 for AdamW, bf16 otherwise), its batches and the method's
    optimizer (`_import_everything` ran before the baseline reading, so import sizes do not count as training
    memory)."""
    import torch

    shape = dict(SHAPES[args.shape])
    shape.update({k: v for k, v in (("batch", args.batch), ("seq", args.seq)) if v})
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = build_model(shape, torch.float32 if spec.optimizer == "adamw" else torch.bfloat16, args.seed, device)
    model.train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batches = make_batches(shape, args.steps + WARMUP_STEPS, args.seed, device)
    after_build = measure_baseline(args)
    model, opt, counted, autocast_dtype = setup_method(spec, model, shape["num_hidden_layers"])
    if args.gradient_checkpointing and spec.optimizer == "lora":
        model.enable_input_require_grads()
    run = Run(spec, model, opt, counted, autocast_dtype, batches, device, shape["num_hidden_layers"],
              shape["batch"] * shape["seq"], after_build)

    def snapshot(*_):  # at the end of each inner optimizer step: grads, masters and state all exist
        snap = count_training_bytes(run.model, run.counted)
        if spec.optimizer == "block":
            snap["own_memory_bytes"] = run.opt.memory_bytes()
            snap["active_block"] = run.opt.active_block_name
        run.snapshots.append(snap)

    counted.register_step_post_hook(snapshot)
    return run


def _import_everything() -> None:
    """Import everything any method needs before the memory baseline."""
    import peft  # noqa: F401
    import transformers.trainer  # noqa: F401  (badam_hf reads HF's weight-decay rule from it)

    import badam_hf.core.optimizer  # noqa: F401
    try:
        import badam  # noqa: F401
    except ImportError:
        pass


def warm_up(run: Run) -> int:
    """Untimed steps first (allocator / kernel warm-up), then, for a block-epoch aligned method, enough more to
    start the timed window at block 0 again. Returns how many were taken."""
    D = run.num_layers
    warm = WARMUP_STEPS + ((-WARMUP_STEPS) % D if run.spec.block_epoch_aligned else 0)
    for _ in range(warm):
        run.step(run.batches[0])
    run.snapshots.clear()
    return warm


def reset_peak(run: Run) -> bool:
    """Start the peak-memory reading here (after the warm-up). False where the CPU peak cannot be reset."""
    import torch

    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    return reset_peak_rss()


def measure_steps(run: Run) -> dict:
    """The timed steps: forward, backward and optimizer-step seconds per step, tokens/s, the losses, and the
    1-minute load average around them (timings are only comparable on an otherwise idle machine)."""
    load_before = os.getloadavg()
    fwd, bwd, stp, losses = [], [], [], []
    wall0 = time.perf_counter()
    for b in run.batches[WARMUP_STEPS:]:
        loss, f, bk, s = run.step(b)
        losses.append(loss)
        fwd.append(f)
        bwd.append(bk)
        stp.append(s)
    wall = time.perf_counter() - wall0
    load_after = os.getloadavg()
    step_time = [a + b + c for a, b, c in zip(fwd, bwd, stp)]
    mean = lambda xs: sum(xs) / len(xs)
    return {
        "steps": len(fwd),
        "time": {
            "forward_s": mean(fwd), "backward_s": mean(bwd), "optimizer_s": mean(stp), "step_s": mean(step_time),
            "per_step_backward_s": bwd, "per_step_forward_s": fwd, "per_step_optimizer_s": stp,
            "wall_s": wall, "tokens_per_s": run.tokens_per_step * len(fwd) / sum(step_time),
            "median_forward_s": statistics.median(fwd), "median_optimizer_s": statistics.median(stp),
        },
        "loadavg_1min_before_after": [load_before[0], load_after[0]],
        "losses": losses,
    }


def merge_rounds(results: list[dict]) -> dict:
    """One method's row from its runs in several rounds: the first run's memory readings, and times over the
    timed steps of every round (mean and median), with each round's mean optimizer step beside them."""
    row = dict(results[0])
    if len(results) == 1:
        return row
    t = dict(row["time"])
    per = {k: [x for r in results for x in r["time"][f"per_step_{k}_s"]] for k in ("forward", "backward", "optimizer")}
    mean = lambda xs: sum(xs) / len(xs)
    step_time = [a + b + c for a, b, c in zip(per["forward"], per["backward"], per["optimizer"])]
    t.update({f"per_step_{k}_s": v for k, v in per.items()})
    t.update({"forward_s": mean(per["forward"]), "backward_s": mean(per["backward"]),
              "optimizer_s": mean(per["optimizer"]), "step_s": mean(step_time),
              "median_forward_s": statistics.median(per["forward"]),
              "median_optimizer_s": statistics.median(per["optimizer"]),
              "wall_s": sum(r["time"]["wall_s"] for r in results),
              "tokens_per_s": row["time"]["tokens_per_s"] * row["time"]["step_s"] / mean(step_time),
              "round_optimizer_s": [r["time"]["optimizer_s"] for r in results]})
    row.update(time=t, steps=len(step_time), rounds=len(results),
               loadavg_1min_before_after=[results[0]["loadavg_1min_before_after"][0],
                                          results[-1]["loadavg_1min_before_after"][1]])
    return row


def measure_peak_memory(run: Run, baseline: dict, peak_reset: bool) -> dict:
    """Peak memory of the timed steps: on GPU max_memory_allocated; on CPU the peak RSS (VmHWM) above the RSS
    before the model was built, so weights count and import sizes do not."""
    import torch

    after_build = run.memory_after_build
    if run.device.type == "cuda":
        return {"peak_bytes": torch.cuda.max_memory_allocated(), "model_bytes_after_build": after_build["gpu"],
                "kind": "torch.cuda.max_memory_allocated"}
    peak = peak_rss_bytes()
    return {
        "peak_bytes": peak - baseline["rss"],  # model + training, above the process's RSS before the build
        "peak_rss_bytes": peak,
        "growth_after_build_bytes": peak - after_build["rss"],
        "rss_before_model_bytes": baseline["rss"],
        "rss_after_model_bytes": after_build["rss"],
        "peak_reset_after_warmup": peak_reset,
        "kind": "VmHWM - VmRSS before the model was built",
    }


def measure_full_backward(run: Run, repeats: int = 3) -> float:
    """The paper's reference point for BAdam's backward: the mean seconds of a full backward of the same bf16
    model (every parameter requires grad, no truncation). Closes the optimizer first (its backward cut and
    fp32 gradient hooks would time a different backward) and leaves every parameter trainable."""
    run.opt.close()
    for p in run.model.parameters():
        p.requires_grad_(True)
    times = []
    for b in run.batches[WARMUP_STEPS:WARMUP_STEPS + min(len(run.batches) - WARMUP_STEPS, repeats)]:
        run.model.zero_grad(set_to_none=True)
        loss = run.model(input_ids=b, labels=b).loss
        run.sync()
        t0 = time.perf_counter()
        loss.backward()
        run.sync()
        times.append(time.perf_counter() - t0)
    run.model.zero_grad(set_to_none=True)
    return sum(times) / len(times)


# --- driver ------------------------------------------------------------------------------------------------


def expected_backward_ratio(D: int) -> float:
    """Paper: a backward through the top D-i+1 layers only, averaged over the D active layers of a block-epoch."""
    return D * (D + 1) / (2 * D * D)


def fmt_gb(b: float) -> str:
    return f"{b / 1e9:.3f}"


def markdown(results: dict, meta: dict) -> str:
    rows = results["methods"]
    ref = rows.get("adamw")
    n = meta.get("rounds", 1)
    rounds = f" in each of {n} rounds (the methods interleaved)" if n > 1 else ""
    lines = [
        f"# BAdam benchmark: shape `{meta['shape']}`",
        "",
        f"Machine: {meta['machine']}. Model: random-init Llama, {meta['total_params'] / 1e6:.1f}M parameters, "
        f"D={meta['num_layers']} layers, batch {meta['batch']} x seq {meta['seq']}, {meta['steps']} timed steps per "
        f"method{rounds}{', gradient checkpointing' if meta['gradient_checkpointing'] else ''}. Each method ran in its own "
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
    for m, rc in meta.get("failed", {}).items():  # e.g. AdamW out of GPU memory at --shape llama3-8b
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
    lines += step_table(rows)
    if results.get("kernel_count"):
        from badam_hf.tools.kernel_count import markdown as kernel_markdown

        lines += kernel_markdown(results["kernel_count"])
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
            f"BlockOptimizer.memory_bytes() says {sum(own.values()):,} (the independent count, step counters "
            f"included: {held + b['step_scalars']:,})."
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
                f"- BAdam optimizer step against AdamW's (it updates ~1/D of the parameters): measured "
                f"{r['time']['optimizer_s']:.4f} s vs {ref['time']['optimizer_s']:.4f} s (ratio {got_s:.3f})."
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
                    f"- Memory against the authors' package at K={METHOD_SPECS[ours].switch_every} (measured in "
                    f"this run): peak growth after the model was built, ours/theirs {gr:.3f} ("
                    f"{training_growth(a) / 2**30:.3f} vs "
                    f"{training_growth(q) / 2**30:.3f} GiB); live tensors above the weights {lr_:.3f}; whole peak "
                    f"(weights included) {mr:.3f}; step time {sr:.3f}."
                )
        lines.append(
            f"- BAdam's per-step backward times over one block-epoch (active layer 0 .. {D - 1}, ascending): "
            + ", ".join(f"{x:.3f}" for x in r["time"]["per_step_backward_s"][:D])
        )
    lines.append("")
    return "\n".join(lines)


def step_table(rows: dict) -> list[str]:
    """The optimizer step of the default rounding (stochastic at a block's end) against nearest and the authors'
    package, per K, from the rows this run measured (`--methods rounding`)."""
    out = []
    for K, (theirs, ours, near) in ROUNDING_ROWS:
        if ours not in rows or not ({theirs, near} & set(rows)):
            continue
        t = lambda m: rows[m]["time"]["optimizer_s"] if m in rows else None
        med = lambda m: rows[m]["time"]["median_optimizer_s"] if m in rows else None
        ratio = lambda a, b: f"{a / b:.2f}" if a is not None and b is not None else "-"
        cell = lambda m: f"{t(m):.4f} ({med(m):.4f})" if m in rows else "-"
        by_round = lambda m: rows[m]["time"].get("round_optimizer_s") if m in rows else None
        per = [a / b for a, b in zip(by_round(ours) or [], by_round(near) or [])]
        out.append(f"| {K} | {cell(theirs)} | {cell(ours)} | {cell(near)} | {ratio(t(ours), t(theirs))} | "
                   f"{ratio(t(ours), t(near))} | {', '.join(f'{x:.2f}' for x in per) or '-'} |")
    if not out:
        return []
    return ["", "## Optimizer step: the default rounding against nearest and the authors' package", "",
            "Seconds per optimizer step, mean (median) over the timed steps of every round, each method in its own "
            "process. Default: `switch_rounding=auto` (stochastic where a block's masters are written the last "
            "time). The last column: default / nearest of each round's means.", "",
            "| K | authors' `badam` | badam_hf default | badam_hf nearest | default / authors' | default / nearest | "
            "by round |",
            "|---|---|---|---|---|---|---|", *out]


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
        if METHOD_SPECS[m].optimizer == "block":
            lv, n = r["live"], r["bytes"]["updated_numel"]
            bound = lv["weights_bytes"] + 16 * n + lv["activations_bytes"]
            lines.append("")
            lines.append(f"- {r['label']}: live peak {lv['peak_bytes']:,} bytes vs weights + 16 bytes x active-block "
                         f"params + activations = {bound:,} (ratio {lv['peak_bytes'] / bound:.3f}).")
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
    from badam_hf.integrations.cpu_compute import cpu_description

    return f"CPU {cpu_description()} ({platform.machine()}), no GPU"


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
    no_kernel_count: bool = False
    rounds: int | None = None  # default: ROUNDING_ROUNDS for the rounding group, else 1
    worker: str | None = None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="cpu")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per method (default: one block-epoch, D = number of layers)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated methods, or a group: {', '.join(f'{k} = {v}' for k, v in GROUPS.items())}")
    p.add_argument("--no-kernel-count", action="store_true",
                   help="leave out the kernel count of one optimizer step over a Llama 3-8B layer (meta device)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<shape>)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=None,
                   help="run the methods this many times, interleaved (round 1 runs each once, then round 2 ...), "
                        f"and time them over every round's steps (default {ROUNDING_ROUNDS} for the rounding group, "
                        "else 1): on a shared or virtual machine the speed drifts between processes")
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
    if args.rounds is None:
        args.rounds = ROUNDING_ROUNDS if args.methods == "rounding" else 1
    if args.rounds < 1:
        p.error("--rounds must be >= 1")

    methods = [m.strip() for m in GROUPS.get(args.methods, args.methods).split(",") if m.strip()]
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
    runs: dict[str, list[dict]] = {}
    failed = {}
    for r in range(args.rounds):
        for m in methods:
            if m in failed:
                continue
            t0 = time.perf_counter()
            label = f"{m} (round {r + 1} of {args.rounds})" if args.rounds > 1 else m
            print(f"[bench] {label}: running ...", flush=True)
            try:
                runs.setdefault(m, []).append(run_isolated(worker, dataclasses.replace(args, worker=m)))
            except IsolatedRunFailed as e:
                # e.g. AdamW running out of GPU memory at --shape llama3-8b: report it and go on with the others.
                print(f"[bench] {m}: {e}", file=sys.stderr)
                failed[m] = e.exitcode
                runs.pop(m, None)
                continue
            print(f"[bench] {label}: done in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = {m: merge_rounds(rs) for m, rs in runs.items()}

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
        "rounds": args.rounds,
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
    if not args.no_kernel_count:
        from badam_hf.tools.kernel_count import count_llama3_8b_layer

        results["kernel_count"] = count_llama3_8b_layer()
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
