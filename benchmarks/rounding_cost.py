"""The cost of the stochastic write-back against the nearest one, on the tensors of one decoder layer.

    python benchmarks/rounding_cost.py [--threads N] [--repeats R] [--shape cpu|llama3-8b]

Writes fp32 masters of one Llama decoder layer (make bench's `cpu` shape by default: hidden 1024, MLP 2816,
8 key/value heads, 11.8M entries in 9 tensors) into bf16 weights, alternately with torch's rounding (nearest:
`copy_`) and with `stochastic_round`, and prints the fastest of R repeats of each (the minimum is what a
loaded machine disturbs least) and their ratio. A measurement of the rounding alone; `make bench
BENCH_ARGS="--methods rounding"` measures whole optimizer steps.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

SHAPES = {"cpu": (1024, 2816, 8, 16), "llama3-8b": (4096, 14336, 8, 32)}


def layer_shapes(hidden: int, mlp: int, kv_heads: int, heads: int) -> list[tuple[int, ...]]:
    kv = hidden // heads * kv_heads
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (mlp, hidden), (mlp, hidden),
            (hidden, mlp), (hidden,), (hidden,)]


def main(argv=None) -> None:
    from badam_hf.core.rounding import SWITCH_STREAM, rounding_key, stochastic_round

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--shape", choices=list(SHAPES), default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    masters = [torch.randn(s, generator=g) * 0.02 for s in layer_shapes(*SHAPES[args.shape])]
    weights = [m.to(torch.bfloat16) for m in masters]

    def nearest():
        for w, m in zip(weights, masters):
            w.copy_(m)

    def stochastic():
        for i, (w, m) in enumerate(zip(weights, masters)):
            stochastic_round(m, rounding_key(0, 1, i, SWITCH_STREAM), out=w)

    best = {"nearest": float("inf"), "stochastic": float("inf")}
    for _ in range(args.repeats):
        for name, fn in (("nearest", nearest), ("stochastic", stochastic)):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    n = sum(m.numel() for m in masters)
    print(f"{n / 1e6:.1f}M entries, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}: "
          f"nearest {best['nearest'] * 1e3:.1f} ms, stochastic {best['stochastic'] * 1e3:.1f} ms, "
          f"ratio {best['stochastic'] / best['nearest']:.2f}")


if __name__ == "__main__":
    main()
