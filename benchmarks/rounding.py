"""How much of a block visit's update survives in bf16 weights: nearest vs stochastic rounding of the masters.

    python benchmarks/rounding.py [--lrs 1e-6,1e-5,1e-4] [--ks 2,20,100] [--layers 15] [--seq 64] [--batch 2]

SmolLM2-135M-Instruct (prepared offline), bf16 weights, BlockOptimizer over one decoder layer (`switch_mode=fixed`,
constant lr, AdamW) on fixed batches of the shared Alpaca records' text (the convergence benchmark's training
split, tokenized with the chat template and cut into `--seq`-token pieces). A visit of K steps is the first K
steps of a visit of max(K) steps (fresh Adam state, constant lr, masters exact between steps), so one run per
(layer, lr) gives every K: the fp32 masters are captured after step K, and the weights the block's last step
would write are computed from them exactly as `BlockOptimizer` writes them (nearest: torch's rounding;
stochastic: `stochastic_round` with the optimizer's key for that step and parameter, plus other seeds for the
spread).

The layers below the visited one are frozen for the whole visit, so their output is the same at every step: it
is computed once per batch (a full forward of the real model), and the visit trains the model cut to the layers
from the visited one up (`inputs_embeds` = that output). Same arithmetic as the whole model, a fraction of the
cost (the backward stops at the visited layer anyway).

Per (lr, K) over the layer's weights: d = master - w0 (the visit's fp32 displacement) and w the bf16 weights
after the write. `survives` = <w - w0, d> / <d, d> (the share of the displacement kept, along its own direction),
`changed` = the share of entries whose bf16 value moved, `noise` = |w - master| / |d| (what the rounding adds or
loses, relative to the update). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    has = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(has) or 'no AVX2'}; {torch.get_num_threads()} threads)"


def token_batches(model_dir: str, data: str, seq: int, batch: int, n: int) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    from badam_hf.data.sft import format_chat, load_alpaca_json, train_val_split

    tok = AutoTokenizer.from_pretrained(model_dir)
    train, _ = train_val_split(load_alpaca_json(data), 0.1, seed=0)
    stream: list[int] = []
    i = 0
    while len(stream) < seq * batch * n:
        prompt, response = format_chat(train[i % len(train)], tok, i)
        stream += tok(prompt + response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        i += 1
    ids = torch.tensor(stream[: seq * batch * n]).view(n, batch, seq)
    return list(ids)


def inputs_of_layer(model, layer: int, batches) -> list[torch.Tensor]:
    """The hidden states entering decoder layer `layer` for each batch (the frozen layers below it, run once)."""
    seen: list[torch.Tensor] = []
    hook = model.model.layers[layer].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    hook.remove()
    return seen


def cut_below(model, layer: int):
    """`model` with the decoder layers below `layer` removed (it takes their output as `inputs_embeds`)."""
    model.model.layers = torch.nn.ModuleList(list(model.model.layers)[layer:])
    model.config.num_hidden_layers = len(model.model.layers)
    return model


def measure(model, lr: float, ks: list[int], batches, hidden, draws: int) -> dict:
    """One visit of the model's first decoder layer (the model is cut so that it is the visited one)."""
    from badam_hf import BlockOptimizer
    from badam_hf.core.rounding import SWITCH_STREAM, rounding_key, stochastic_round

    opt = BlockOptimizer(model, lr=lr, switch_every=max(ks), switch_mode="fixed", start_block=0, seed=0)
    names = list(opt.partition.blocks[0].param_names)
    w0 = {n: opt.params_by_name[n].detach().float().clone() for n in names}
    captured: dict[int, dict[str, torch.Tensor]] = {}
    count = {"step": 0}

    def grab(o, a, k):
        count["step"] += 1
        if count["step"] in ks:
            captured[count["step"]] = {n: opt.masters[n].detach().clone() for n in names}

    opt.inner.register_step_post_hook(grab)
    for step in range(max(ks)):
        if step % 10 == 0:
            print(f"[rounding] lr {lr:g}: step {step}", file=sys.stderr, flush=True)
        ids, h = batches[step % len(batches)], hidden[step % len(batches)]
        model(inputs_embeds=h, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    out = {}
    for k in ks:
        rows = {}
        masters = captured[k]
        writes = {"nearest": [{n: m.to(torch.bfloat16) for n, m in masters.items()}],
                  "stochastic": [{n: stochastic_round(m, rounding_key(seed, k, opt._index[n], SWITCH_STREAM))
                                  for n, m in masters.items()} for seed in range(draws)]}
        dd = sum(float((masters[n] - w0[n]).double().square().sum()) for n in names)
        for rounding, ws in writes.items():
            surv, changed, noise = [], [], []
            for w in ws:
                dot = sum(float(((w[n].float() - w0[n]).double() * (masters[n] - w0[n]).double()).sum()) for n in names)
                moved = sum(int((w[n].float() != w0[n]).sum()) for n in names)
                err = sum(float((w[n].float() - masters[n]).double().square().sum()) for n in names)
                surv.append(dot / dd)
                changed.append(moved / sum(w0[n].numel() for n in names))
                noise.append((err / dd) ** 0.5)
            rows[rounding] = {"survives": surv, "changed": changed, "noise": noise}
        out[k] = rows
    del opt
    return out


def load(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model.config.use_cache = False
    return model


def fmt(values: list[float], pct: bool = True) -> str:
    scale = 100.0 if pct else 1.0
    mean = sum(values) / len(values) * scale
    if len(values) == 1:
        return f"{mean:.3g}%" if pct else f"{mean:.3g}"
    spread = (max(values) - min(values)) * scale / 2
    return f"{mean:.3g}% ± {spread:.2g}" if pct else f"{mean:.3g} ± {spread:.2g}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--lrs", default="1e-6,1e-5,1e-4")
    p.add_argument("--ks", default="2,20,100")
    p.add_argument("--layers", default="15", help="decoder layers to visit (comma-separated)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--batches", type=int, default=10, help="distinct batches, cycled")
    p.add_argument("--draws", type=int, default=3, help="stochastic roundings per visit (other seeds)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    if not Path(a.data).is_file():
        print(f"rounding: --data {a.data}: no such file (the shared Alpaca records live in ../shared/data/)",
              file=sys.stderr)
        return 2
    from badam_hf.integrations.cpu_compute import fp32_linear_compute
    from badam_hf.integrations.pretrained import prepare_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    lrs = [float(x) for x in a.lrs.split(",")]
    ks = sorted(int(x) for x in a.ks.split(","))
    layers = [int(x) for x in a.layers.split(",")]
    model_dir = str(prepare_model("smollm2-135m-instruct"))
    batches = token_batches(model_dir, a.data, a.seq, a.batch, a.batches)
    t0 = time.perf_counter()
    print(f"SmolLM2-135M-Instruct, bf16 weights; one visit of decoder layer(s) {', '.join(map(str, layers))} "
          f"(AdamW, constant lr, batch {a.batch} x {a.seq} tokens of the Alpaca training split); stochastic: mean "
          f"± half-range over {a.draws} seeds. {cpu_name()}.\n")
    print("| layer | lr | K | survives, nearest | survives, stochastic | entries changed, nearest | "
          "entries changed, stochastic | noise, nearest | noise, stochastic |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    with fp32_linear_compute():
        for layer in layers:
            hidden = inputs_of_layer(load(model_dir), layer, batches)
            for lr in lrs:
                # A fresh model per run: an optimizer's hooks stay on the parameters it was built over.
                by_k = measure(cut_below(load(model_dir), layer), lr, ks, batches, hidden, a.draws)
                for k, rows in by_k.items():  # printed as they come: a long run shows its rows early
                    n, s = rows["nearest"], rows["stochastic"]
                    print(f"| {layer} | {lr:g} | {k} | {fmt(n['survives'])} | {fmt(s['survives'])} | "
                          f"{fmt(n['changed'])} | {fmt(s['changed'])} | {fmt(n['noise'], False)} | "
                          f"{fmt(s['noise'], False)} |", flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s in all.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
