"""`python -m badam_hf.demo`: the real-model demo by default (`finetune_demo`: SmolLM2-135M-Instruct), and
with `--tiny` the fast path the tests use: BAdam against AdamW on a tiny Llama trained from scratch.

    python -m badam_hf.demo [--out DIR] [--steps N] [--lora] [--methods badam,adamw,lora]
    python -m badam_hf.demo --tiny [--out DIR] [--steps N] [--data PATH]

Without `--data` it makes its own small instruction set (arithmetic and word tasks, seeded); with
`--data` it reads Alpaca records (a JSON list or JSON Lines). It trains a local BPE tokenizer on the
data, builds a small `LlamaForCausalLM` from a config, and fine-tunes it twice on the same batches
with the same learning-rate schedule: once with `BAdamTrainer`, once with `Trainer` and AdamW. Each
run happens in a fresh process, so its peak resident memory is its own. The report folder gets
`loss.png`, `report.md` and `results.json`.

Nothing is downloaded. On a tiny randomly initialised model the point is the mechanics (loss falls
under BAdam, a fraction of AdamW's optimizer state), not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..core.optimizer import unwrap_optimizer
from ..data.sft import (
    IGNORE_INDEX,
    SFTCollator,
    SFTDataset,
    alpaca_texts,
    build_local_tokenizer,
    load_alpaca_json,
    tokenize_sft,
)
from ..data.synthetic import make_synthetic_records
from .harness import optimizer_state_bytes, peak_rss_kb, plot_curves, run_isolated, switch_positions, watch_state_peak

# The tiny path compares the two methods whose runs it can make equal: the same weights, batches and schedule.
TINY_METHODS = ("badam", "adamw")


def _train_one(method: str, job: dict) -> dict:
    """One training run, in a process of its own. Returns its losses and measurements."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from ..core.config import BAdamConfig, PartitionConfig, ScheduleConfig
    from ..integrations.trainer import BAdamTrainer

    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    config = LlamaConfig(vocab_size=job["vocab_size"], pad_token_id=job["pad_token_id"], **job["model"])
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lr = job["lr"]

    peak_state = {"bytes": 0}

    def note_state(nbytes: int) -> None:
        peak_state["bytes"] = max(peak_state["bytes"], nbytes)

    class StateBytes(TrainerCallback):
        # The largest optimizer state seen: BAdam drops a block's state inside the step that ends its visit.
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is not None:
                watch_state_peak(optimizer, note_state)

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is not None:
                note_state(optimizer_state_bytes(optimizer))

    # Nothing is saved (save_strategy="no"); the Trainer still wants a folder, so give it a throwaway one.
    scratch = tempfile.TemporaryDirectory(prefix=f"badam_demo_{method}_")
    args = TrainingArguments(
        output_dir=scratch.name,
        max_steps=job["steps"],
        per_device_train_batch_size=job["batch_size"],
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=job["warmup_steps"],
        weight_decay=0.0,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=job["seed"],
        data_seed=job["seed"],
        dataloader_num_workers=0,
        disable_tqdm=True,
        log_level="error",
    )
    common = dict(
        model=model,
        args=args,
        train_dataset=SFTDataset(job["features"]),
        data_collator=SFTCollator(job["pad_token_id"]),
        callbacks=[StateBytes()],
    )
    if method == "badam":
        badam = BAdamConfig(
            partition=PartitionConfig(**job["partition"]),
            schedule=ScheduleConfig(switch_every=job["switch_every"], switch_mode=job["switch_mode"], seed=job["seed"]),
        )
        trainer = BAdamTrainer(badam_config=badam, **common)
    else:
        trainer = Trainer(**common)

    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # the demo prints its own summary, not one dict per step
    trainer.remove_callback(ProgressCallback)
    rss_before = peak_rss_kb()
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    logged = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    result: dict[str, Any] = {
        "method": method,
        "lr": lr,
        "steps": [h["step"] for h in logged],
        "losses": [h["loss"] for h in logged],
        "active_blocks": [h.get("badam/active_block") for h in logged] if method == "badam" else None,
        "wall_time_s": wall,
        "peak_rss_mb": peak_rss_kb() / 1024,
        "rss_growth_mb": (peak_rss_kb() - rss_before) / 1024,
        "optimizer_state_bytes": peak_state["bytes"],
        "num_parameters": n_params,
        "trainable_parameters": n_trainable,
    }
    if method == "badam":
        opt = unwrap_optimizer(trainer.optimizer)
        result["num_blocks"] = opt.num_blocks
        result["block_names"] = list(opt.partition.names)
    scratch.cleanup()
    return result


def _run_isolated(method: str, job: dict, isolate: bool) -> dict:
    return run_isolated(_train_one, method, job, isolate=isolate)


def _window_mean(values: list[float], n: int, tail: bool) -> float:
    part = values[-n:] if tail else values[:n]
    return sum(part) / len(part)


def _plot(path: Path, results: dict, switch_every: int, steps: int, title: str) -> None:
    curves = {m: (list(range(1, len(results[m]["losses"]) + 1)), results[m]["losses"]) for m in TINY_METHODS}
    plot_curves(path, [{"x": "optimizer step", "y": "training loss (response tokens)", "switches": True,
                        "curves": curves}], switch_positions(steps, switch_every), title=title)


def _report_md(summary: dict) -> str:
    s = summary
    lines = [
        "# BAdam vs AdamW: CPU demo",
        "",
        f"Data: {s['data']} ({s['num_train_records']} records, cutoff {s['cutoff_len']} tokens"
        + (f"; {s['num_dropped_records']} left out: prompt longer than the cutoff" if s["num_dropped_records"] else "")
        + "). "
        f"Model: LlamaForCausalLM from a config, {s['num_parameters']:,} parameters "
        f"({s['model']['num_hidden_layers']} layers, hidden {s['model']['hidden_size']}), fp32, trained from "
        f"random initialisation. {s['steps']} steps, batch {s['batch_size']}, lr {s['lr']} (cosine, "
        f"{s['warmup_steps']} warm-up steps), seed {s['seed']}. Both runs see the same batches.",
        "",
        f"BAdam: {s['num_blocks']} blocks ({', '.join(s['block_names'])}), switch_every={s['switch_every']}, "
        f"switch_mode={s['switch_mode']}.",
        "",
        f"| method | first-{s['window']}-steps loss | final loss (mean of last {s['window']}) | train wall time (s) "
        "| peak RSS (MB) | RSS growth in training (MB) | optimizer state (bytes) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, name in (("badam", "BAdam"), ("adamw", "AdamW")):
        r = s["results"][method]
        lines.append(
            f"| {name} | {r['first_loss']:.4f} | {r['final_loss']:.4f} | {r['wall_time_s']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['rss_growth_mb']:.0f} | {r['optimizer_state_bytes']:,} |"
        )
    lines += [
        "",
        "Notes:",
        "- Each method ran in a fresh process" + ("" if s["isolated"] else " (disabled for this run)") + ", so peak RSS"
        " is per method; it includes the Python, torch and transformers baseline, which dominates at this size.",
        "- Optimizer state is the largest seen after any step: AdamW's moments for every parameter; BAdam's "
        "moments (and fp32 masters, none here in fp32) for the active block only.",
        "- The loss is over response tokens only (prompt tokens carry label -100).",
        "",
        "![loss curves](loss.png)",
        "",
    ]
    return "\n".join(lines)


def prepare_training(records: list[dict], vocab_size: int, cutoff_len: int, hidden_size: int, num_layers: int):
    """Tokenizer, features and a small Llama shape for `records`: (tokenizer, features, dropped, model)."""
    tokenizer = build_local_tokenizer(alpaca_texts(records), vocab_size)
    features = tokenize_sft(records, tokenizer, cutoff_len)
    # A record whose prompt fills the whole cutoff has no trained token left: leave it out.
    keep = [i for i, labels in enumerate(features["labels"]) if any(t != IGNORE_INDEX for t in labels)]
    if not keep:
        raise ValueError(f"every record's prompt is longer than cutoff_len={cutoff_len}; raise cutoff_len.")
    features = {k: [v[i] for i in keep] for k, v in features.items()}
    model = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(cutoff_len, 64),
        tie_word_embeddings=False,
    )
    return tokenizer, features, len(records) - len(keep), model


def run_demo(
    out_dir: str | Path = "badam_demo",
    steps: int = 500,
    data_path: str | Path | None = None,
    *,
    num_records: int = 400,
    max_records: int | None = 600,
    cutoff_len: int = 128,
    vocab_size: int = 600,
    batch_size: int = 16,
    lr: float = 3e-3,
    warmup_steps: int = 10,
    switch_every: int = 25,
    switch_mode: str = "descending",
    hidden_size: int = 64,
    num_layers: int = 4,
    include_lm_head: bool = True,
    seed: int = 0,
    threads: int = 1,
    window: int = 10,
    isolate: bool = True,
    verbose: bool = True,
) -> dict:
    """Train BAdam and AdamW on the same data and steps; write `loss.png`, `report.md`, `results.json`.

    Returns the summary written to `results.json`. `isolate=False` runs both methods in this process
    (faster to start, but peak RSS is then shared between them).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if data_path is not None:
        data_path = Path(data_path).expanduser()
        if not data_path.is_absolute():
            data_path = Path.cwd() / data_path
        records = load_alpaca_json(data_path)
        data_name = str(data_path)
        if max_records is not None:
            records = records[:max_records]
    else:
        records = make_synthetic_records(num_records, seed)
        data_name = f"synthetic arithmetic/word tasks (seed {seed})"
    if not records:
        raise ValueError("no records to train on.")

    tokenizer, features, dropped, model = prepare_training(records, vocab_size, cutoff_len, hidden_size, num_layers)
    job = dict(
        features=features,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        model=model,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        switch_every=switch_every,
        switch_mode=switch_mode,
        # A model trained from scratch needs its output layer to learn too: give the head a block of its own.
        partition=dict(include_lm_head=include_lm_head),
        seed=seed,
        threads=threads,
        out_dir=str(out),
    )
    results = {}
    t0 = time.perf_counter()
    for method in TINY_METHODS:
        if verbose:
            print(f"[badam_hf.demo] training with {method} for {steps} steps ...", flush=True)
        results[method] = _run_isolated(method, job, isolate)
    total = time.perf_counter() - t0
    w = max(1, min(window, steps // 4 or 1))
    for r in results.values():
        r["first_loss"] = _window_mean(r["losses"], w, tail=False)
        r["final_loss"] = _window_mean(r["losses"], w, tail=True)
    summary = {
        "data": data_name,
        "num_train_records": len(features["input_ids"]),
        "num_dropped_records": dropped,
        "cutoff_len": cutoff_len,
        "vocab_size": len(tokenizer),
        "model": model,
        "num_parameters": results["badam"]["num_parameters"],
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "switch_every": switch_every,
        "switch_mode": switch_mode,
        "num_blocks": results["badam"]["num_blocks"],
        "block_names": results["badam"]["block_names"],
        "seed": seed,
        "threads": threads,
        "window": w,
        "isolated": isolate,
        "total_time_s": total,
        "results": results,
        "out_dir": str(out.resolve()),
    }
    _plot(out / "loss.png", results, switch_every, steps, f"BAdam vs AdamW, {Path(data_name).name if data_path else 'synthetic tasks'}")
    (out / "report.md").write_text(_report_md(summary), encoding="utf-8")
    (out / "results.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if verbose:
        for method in TINY_METHODS:
            r = results[method]
            print(
                f"[badam_hf.demo] {method}: loss {r['first_loss']:.3f} -> {r['final_loss']:.3f}, "
                f"{r['wall_time_s']:.1f}s, optimizer state {r['optimizer_state_bytes']:,} bytes"
            )
        print(f"[badam_hf.demo] report written to {out.resolve()}/report.md (and loss.png, results.json)")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m badam_hf.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="the fast path: a tiny Llama trained from scratch on generated tasks (seconds)")
    parser.add_argument("--out", default=None, help="report folder (default: ./demo_report; --tiny: ./badam_demo)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default: 60; --tiny: 500)")
    parser.add_argument("--lora", action="store_true",
                        help="also LoRA r=8 on q, v (the real-model demo; slowest of the three on a CPU without bf16 "
                        "arithmetic)")
    parser.add_argument("--methods", default=None,
                        help="the real-model demo's methods, comma-separated, from badam,adamw,lora (default: badam,adamw)")
    parser.add_argument("--data", default=None, help="--tiny: Alpaca JSON/JSONL file; default: a built-in synthetic set")
    parser.add_argument("--switch-every", type=int, default=None, help="BAdam's K (default: 2; --tiny: 25)")
    parser.add_argument("--switch-mode", default=None, choices=["ascending", "descending", "random"])
    parser.add_argument("--lr", type=float, default=None, help="--tiny: the learning rate of both methods (3e-3)")
    parser.add_argument("--max-records", type=int, default=600, help="--tiny: use at most this many records of --data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per run (default: 2; --tiny: 1, since more gain little at that size and cost much on a "
        "busy machine)",
    )
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.tiny and (args.lora or args.methods):
        parser.error("--lora and --methods belong to the real-model demo (--tiny compares BAdam and AdamW)")
    if args.data is not None and not Path(args.data).expanduser().exists():
        parser.error(f"--data {args.data}: no such file")
    if not args.tiny:
        from ..core.errors import BAdamError
        from .finetune_demo import DEFAULT_METHODS, DemoSettings, run_finetune_demo

        given = {k: v for k, v in dict(out_dir=args.out, steps=args.steps, switch_every=args.switch_every,
                                        switch_mode=args.switch_mode, threads=args.threads, seed=args.seed).items()
                 if v is not None}
        if args.methods:
            given["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        if args.lora:
            given["methods"] = tuple(dict.fromkeys((*given.get("methods", DEFAULT_METHODS), "lora")))
        if args.data is not None or args.lr is not None:
            parser.error("--data and --lr belong to --tiny (the real-model demo has its own task and learning rates)")
        try:
            run_finetune_demo(DemoSettings(**given))
        except BAdamError as e:
            parser.error(str(e))
        return 0
    run_demo(
        args.out or "badam_demo",
        steps=args.steps or 500,
        data_path=args.data,
        switch_every=args.switch_every or 25,
        switch_mode=args.switch_mode or "descending",
        lr=args.lr or 3e-3,
        max_records=args.max_records,
        seed=args.seed,
        threads=args.threads or 1,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
