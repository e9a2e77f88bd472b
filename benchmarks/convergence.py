"""Convergence on real instruction data: BAdam, AdamW and LoRA, same model, batches, steps and schedule.

    python benchmarks/convergence.py [--data PATH] [--steps N] [--out DIR] [--no-isolate]

Reads the Alpaca records in `../shared/data/alpaca_en_demo.json` (next to the repository; `--data` for
another file), trains a local byte-level BPE tokenizer on them, builds a small `LlamaForCausalLM` from a
config and trains it three times on the same batches with the same learning-rate schedule:

- BAdam: `badam_hf.BAdamTrainer`, one block per layer plus the output side (final norm + LM head),
- AdamW: the plain `Trainer` with `optim="adamw_torch"`, every parameter trained,
- LoRA: peft `LoraConfig(r=8)` on `q_proj`, `v_proj`, the base model frozen.

Each method runs in a fresh process (`--no-isolate` runs them here). The output folder gets
`convergence.png` (the three training-loss curves, BAdam's block switches as dotted lines),
`results.json` and `results.md`.

No pretrained weights can be downloaded here, so the model starts from random initialisation. That is
a hard setting for LoRA: a low-rank update of a random network, with the embeddings and the head frozen
at random values, can learn little; its flat curve is expected and says nothing about LoRA on a
pretrained model. The curves show whether BAdam, which trains one block at a time, keeps up with AdamW
for the same steps.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, without an installed package
    sys.path.insert(0, str(REPO))

from badam_hf.data.sft import load_alpaca_json  # noqa: E402
# One training run per method, each in a fresh process: the demo's worker (it also knows LoRA).
from badam_hf.tools.demo import _run_isolated as _run, _window_mean, prepare_training  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "convergence"
METHODS = ("badam", "adamw", "lora")
NAMES = {"badam": "BAdam", "adamw": "AdamW", "lora": "LoRA r=8 (q,v)"}
STYLES = {"badam": "-", "adamw": "--", "lora": "-."}


def _switch_steps(result: dict) -> list[int]:
    """Steps after which BAdam's active block changed, read from its logged block (the schedule otherwise)."""
    blocks, steps = result.get("active_blocks") or [], result["steps"]
    if blocks and all(b is not None for b in blocks):
        return [steps[i - 1] for i in range(1, len(blocks)) if blocks[i] != blocks[i - 1]]
    return []


def _plot(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for method in summary["methods"]:
        r = summary["results"][method]
        ax.plot(r["steps"], r["losses"], STYLES[method], linewidth=1.1, label=f"{NAMES[method]} (lr {r['lr']:g})")
    for k, s in enumerate(summary["badam_switch_steps"]):
        ax.axvline(s + 0.5, color="gray", linestyle=":", linewidth=0.8, label="BAdam block switch" if k == 0 else None)
    m = summary["model"]
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (response tokens)")
    ax.set_title(
        f"{Path(summary['data']).name}: {summary['num_train_records']} records, Llama {m['num_hidden_layers']}x"
        f"{m['hidden_size']} from random init, batch {summary['batch_size']}"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _results_md(s: dict) -> str:
    m = s["model"]
    lines = [
        "# Convergence: BAdam vs AdamW vs LoRA",
        "",
        f"Data: `{Path(s['data']).name}`, {s['num_train_records']} records"
        + (f" ({s['num_dropped_records']} left out: prompt longer than the cutoff)" if s["num_dropped_records"] else "")
        + f", cutoff {s['cutoff_len']} tokens, local byte-level BPE tokenizer ({s['vocab_size']} tokens). "
        f"Model: LlamaForCausalLM from a config ({m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
        f"{s['num_parameters']:,} parameters), fp32, **random initialisation** (no pretrained weights can be "
        f"downloaded here). {s['steps']} steps, batch {s['batch_size']}, cosine schedule with {s['warmup_steps']} "
        f"warm-up steps, seed {s['seed']}; every method sees the same batches. {s['threads']} torch thread(s).",
        "",
        f"BAdam: {s['num_blocks']} blocks ({', '.join(s['block_names'])}), switch_every={s['switch_every']}, "
        f"switch_mode={s['switch_mode']}.",
        "",
        f"| method | lr | trainable params | first-{s['window']}-steps loss | final loss (mean of last {s['window']}) "
        "| train wall time (s) | optimizer state (bytes) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in s["methods"]:
        r = s["results"][method]
        lines.append(
            f"| {NAMES[method]} | {r['lr']:g} | {r['trainable_parameters']:,} | {r['first_loss']:.4f} | "
            f"{r['final_loss']:.4f} | {r['wall_time_s']:.1f} | {r['optimizer_state_bytes']:,} |"
        )
    lines += [
        "",
        "Notes:",
        "- The loss is over response tokens only (prompt tokens carry label -100); it is the training loss of "
        "each step's batch, so it is noisy.",
        "- BAdam's trainable parameters are those of the whole model, one block at a time; its optimizer state "
        "is the largest seen after any step (the active block's Adam moments only).",
        "- Per step BAdam updates one block (about 1/" + str(s["num_blocks"]) + " of the model) where AdamW updates "
        "all of it, and " + ("its blocks include the input embeddings" if s["include_embedding"] else
        "the input embeddings are not among its blocks (the paper's default), so they stay at their random "
        "values; `--include-embedding` gives them a block") + ". From random initialisation that costs BAdam "
        "loss per step against AdamW; it is cheaper per step (backward stops at the active block) and holds "
        "optimizer state for one block only.",
        "- LoRA on a randomly initialised base learns little: the embeddings, the head and every other weight stay "
        "at their random values, only low-rank updates to q_proj and v_proj are trained. Its flat curve is the "
        "expected result of that setting, not a verdict on LoRA with a pretrained model.",
        f"- Total time (process start-up included): {s['total_time_s']:.1f} s.",
        "",
        "![loss curves](convergence.png)",
        "",
    ]
    return "\n".join(lines)


def run_convergence(
    data_path: str | Path = DEFAULT_DATA,
    out_dir: str | Path = DEFAULT_OUT,
    *,
    steps: int = 400,
    max_records: int | None = None,
    cutoff_len: int = 256,
    vocab_size: int = 1000,
    batch_size: int = 8,
    lr: float = 2e-3,
    lora_lr: float | None = None,
    warmup_steps: int = 10,
    switch_every: int = 25,
    switch_mode: str = "descending",
    hidden_size: int = 128,
    num_layers: int = 4,
    include_embedding: bool = False,
    seed: int = 0,
    threads: int = 1,
    window: int = 20,
    methods: tuple[str, ...] = METHODS,
    isolate: bool = True,
    verbose: bool = True,
) -> dict:
    """Train every method in `methods` on the same batches; write convergence.png, results.json, results.md."""
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}.")
    if "badam" not in methods:
        raise ValueError("the comparison needs 'badam' among the methods.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_path = Path(data_path).expanduser().resolve()
    records = load_alpaca_json(data_path)
    if max_records is not None:
        records = records[:max_records]
    if not records:
        raise ValueError(f"{data_path} has no records.")

    t0 = time.perf_counter()
    tokenizer, features, dropped, model = prepare_training(records, vocab_size, cutoff_len, hidden_size, num_layers)
    job = dict(
        features=features,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        model=model,
        steps=steps,
        batch_size=batch_size,
        lr={"badam": lr, "adamw": lr, "lora": lora_lr if lora_lr is not None else lr},
        warmup_steps=warmup_steps,
        switch_every=switch_every,
        switch_mode=switch_mode,
        # From scratch the output layer must learn too: it gets a block of its own.
        partition=dict(include_lm_head=True, include_embedding=include_embedding),
        seed=seed,
        threads=threads,
    )
    results = {}
    for method in methods:
        if verbose:
            print(f"[convergence] training {NAMES[method]} for {steps} steps ...", flush=True)
        results[method] = _run(method, job, isolate)
        if verbose:
            r = results[method]
            print(f"[convergence]   {r['wall_time_s']:.1f}s, last loss {r['losses'][-1]:.3f}", flush=True)
    total = time.perf_counter() - t0
    w = max(1, min(window, steps // 4 or 1))
    for r in results.values():
        r["first_loss"] = _window_mean(r["losses"], w, tail=False)
        r["final_loss"] = _window_mean(r["losses"], w, tail=True)
        r["all_finite"] = all(math.isfinite(x) for x in r["losses"])
    badam = results["badam"]
    summary = {
        "data": str(data_path),
        "num_train_records": len(features["input_ids"]),
        "num_dropped_records": dropped,
        "cutoff_len": cutoff_len,
        "vocab_size": len(tokenizer),
        "model": model,
        "random_init": True,
        "num_parameters": badam["num_parameters"],
        "steps": steps,
        "batch_size": batch_size,
        "warmup_steps": warmup_steps,
        "switch_every": switch_every,
        "switch_mode": switch_mode,
        "num_blocks": badam["num_blocks"],
        "block_names": badam["block_names"],
        "include_embedding": include_embedding,
        "badam_switch_steps": _switch_steps(badam),
        "seed": seed,
        "threads": threads,
        "window": w,
        "isolated": isolate,
        "methods": list(methods),
        "total_time_s": total,
        "results": results,
        "out_dir": str(out.resolve()),
    }
    _plot(out / "convergence.png", summary)
    md = _results_md(summary)
    (out / "results.md").write_text(md, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if verbose:
        print()
        print(md.split("![loss curves]")[0].rstrip())
        print(f"\n[convergence] wrote {out.resolve()}/convergence.png, results.json, results.md")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help=f"Alpaca JSON/JSONL (default: {DEFAULT_DATA})")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: benchmarks/results/convergence)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--max-records", type=int, default=None)
    p.add_argument("--cutoff-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of every method (default 2e-3)")
    p.add_argument("--lora-lr", type=float, default=None, help="LoRA's own peak learning rate (default: --lr)")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--switch-every", type=int, default=25, help="BAdam's K (default 25)")
    p.add_argument("--switch-mode", default="descending", choices=["ascending", "descending", "random"])
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--include-embedding", action="store_true", help="give BAdam the embeddings as a block too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--window", type=int, default=20, help="steps averaged for the first/final loss")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--no-isolate", action="store_true", help="run every method in this process")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if not Path(args.data).expanduser().exists():
        print(f"[convergence] {args.data}: no such file; nothing to do (pass --data PATH).", file=sys.stderr)
        return 2
    run_convergence(
        args.data,
        args.out,
        steps=args.steps,
        max_records=args.max_records,
        cutoff_len=args.cutoff_len,
        vocab_size=args.vocab_size,
        batch_size=args.batch_size,
        lr=args.lr,
        lora_lr=args.lora_lr,
        warmup_steps=args.warmup_steps,
        switch_every=args.switch_every,
        switch_mode=args.switch_mode,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        include_embedding=args.include_embedding,
        seed=args.seed,
        threads=args.threads,
        window=args.window,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        isolate=not args.no_isolate,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
