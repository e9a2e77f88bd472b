"""DPO through TRL's own `trl/scripts/dpo.py` (unchanged) under `badam_hf.run`: BAdam with nearest vs stochastic
switch rounding at DPO learning rates, beside AdamW, on a local preference set.

    python benchmarks/dpo_rounding.py [--out DIR] [--train 64] [--test 32] [--steps 40] [--lrs 1e-6,5e-6]

SmolLM2-135M-Instruct (prepared offline). The preference set is the demo's dates task: the prompt asks to write an
ISO date in words; `chosen` is the date in words ("November 23, 2019"), `rejected` the ISO echo the model gives
before fine-tuning. Held-out pairs share no date with the training ones. For each lr and method the script runs

    python -c "<fp32 linear products on CPU> badam_hf.run.main([dpo.py, ...])"

i.e. `python -m badam_hf.run .../trl/scripts/dpo.py --optim badam --optim_args ...` inside
`badam_hf.integrations.cpu_compute.fp32_linear_compute()` (CPU bf16 products in fp32; the script and TRL are
untouched), evaluates on the held-out pairs at the end (TRL's `eval_rewards/accuracies` and
`eval_rewards/margins`) and prints a markdown table. Methods: badam (bf16 weights, one block per layer, K =
`--switch-every`, random order, switch_rounding nearest), badam_sr (the same with switch_rounding=stochastic),
adamw (fp32 weights, TRL's defaults otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("badam", "badam_sr", "adamw")
WRAPPER = (
    "import sys\n"
    "from badam_hf.integrations.cpu_compute import fp32_linear_compute\n"
    "from badam_hf.run import main\n"
    "with fp32_linear_compute():\n"
    "    code = main(sys.argv[1:])\n"
    "sys.exit(code)\n"
)


def preference_rows(n: int, seed: int, exclude=None) -> list[dict]:
    from badam_hf.data.synthetic import make_date_records

    rows = []
    for r in make_date_records(n, seed=seed, exclude=exclude):
        prompt = [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"}]
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": r["output"]}],
                     "rejected": [{"role": "assistant", "content": r["input"]}]})
    return rows


def write_dataset(folder: Path, n_train: int, n_test: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    train = preference_rows(n_train, seed)
    test = preference_rows(n_test, seed + 1, exclude={r["rejected"][0]["content"] for r in train})
    for name, rows in (("train", train), ("test", test)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def dpo_args(method: str, lr: float, a, model_dir: str, data: Path, out: Path) -> list[str]:
    import trl

    script = Path(trl.__file__).parent / "scripts" / "dpo.py"
    args = [str(script), "--model_name_or_path", model_dir, "--dataset_name", str(data), "--output_dir", str(out),
            "--learning_rate", str(lr), "--lr_scheduler_type", "constant", "--max_steps", str(a.steps),
            "--per_device_train_batch_size", str(a.batch), "--per_device_eval_batch_size", str(a.batch),
            "--max_length", "64", "--eval_strategy", "steps", "--eval_steps", str(a.steps),
            "--save_strategy", "steps", "--save_steps", str(a.steps), "--save_only_model", "True",
            "--use_cpu", "True", "--bf16", "False", "--gradient_checkpointing", "False", "--logging_steps", "1",
            "--report_to", "none", "--disable_tqdm", "True", "--dataloader_num_workers", "0", "--seed", str(a.seed)]
    if method == "adamw":
        return args + ["--dtype", "float32", "--optim", "adamw_torch"]
    rounding = "stochastic" if method == "badam_sr" else "nearest"
    return args + ["--dtype", "bfloat16", "--optim", "badam", "--optim_args",
                   f"switch_every={a.switch_every},switch_mode=random,seed={a.seed},switch_rounding={rounding}"]


def final_eval(out: Path, steps: int) -> dict:
    history = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())["log_history"]
    evals = [h for h in history if "eval_rewards/accuracies" in h]
    return evals[-1] if evals else {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dpo_rounding"))
    p.add_argument("--train", type=int, default=64)
    p.add_argument("--test", type=int, default=32)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--switch-every", type=int, default=4)
    p.add_argument("--lrs", default="1e-6,5e-6")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        print(f"dpo_rounding: --methods {a.methods}: choose from {', '.join(METHODS)}.", file=sys.stderr)
        return 2
    from badam_hf.integrations.pretrained import prepare_model

    out = Path(a.out)
    data = out / "data"
    write_dataset(data, a.train, a.test, a.seed)
    model_dir = str(prepare_model("smollm2-135m-instruct"))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(out / "hf_datasets"), OMP_NUM_THREADS=str(a.threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))
    results = {}
    t0 = time.perf_counter()
    for lr in [float(x) for x in a.lrs.split(",")]:
        for method in methods:
            run_dir = out / f"{method}_lr{lr:g}"
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", WRAPPER, *dpo_args(method, lr, a, model_dir, data, run_dir)],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            results[(method, lr)] = final_eval(run_dir, a.steps) | {"seconds": time.perf_counter() - start}
            r = results[(method, lr)]
            print(f"[dpo] {method} lr {lr:g}: accuracy {r.get('eval_rewards/accuracies')}, margin "
                  f"{r.get('eval_rewards/margins')}, {r['seconds']:.0f} s", file=sys.stderr, flush=True)
    (out / "results.json").write_text(json.dumps({f"{m} {lr:g}": r for (m, lr), r in results.items()}, indent=1))
    print(f"DPO (TRL {__import__('trl').__version__} trl/scripts/dpo.py, unchanged) on SmolLM2-135M-Instruct: "
          f"{a.train} training / {a.test} held-out date pairs (chosen: the date in words, rejected: the ISO echo), "
          f"{a.steps} steps of batch {a.batch}, constant lr, beta 0.1; BAdam K={a.switch_every}, random order. "
          f"{time.perf_counter() - t0:.0f} s in all.\n")
    print("| method | lr | held-out reward accuracy | held-out reward margin | held-out loss |")
    print("|---|---|---|---|---|")
    names = {"badam": "BAdam, nearest", "badam_sr": "BAdam, stochastic", "adamw": "AdamW (fp32 weights)"}
    for (m, lr), r in results.items():
        print(f"| {names[m]} | {lr:g} | {r.get('eval_rewards/accuracies', float('nan')):.3f} | "
              f"{r.get('eval_rewards/margins', float('nan')):.4f} | {r.get('eval_loss', float('nan')):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
