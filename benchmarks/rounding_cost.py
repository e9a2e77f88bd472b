"""The cost of the stochastic write-back against the nearest one, on the tensors of one decoder layer.

    python benchmarks/rounding_cost.py [--threads N] [--repeats R] [--shape cpu|llama3-8b] [--chunks 16,18,19]

Writes fp32 masters of one Llama decoder layer (make bench's `cpu` shape by default: hidden 1024, MLP 2816,
8 key/value heads, 11.8M entries in 9 tensors) into bf16 weights, alternately with torch's rounding (nearest:
`copy_`) and with the optimizer's stochastic write-back of a block (`store_stochastic_many`), and prints the
best and the median of R repeats of each and their ratio. Before each repeat a 320 MB sweep evicts the
caches, as the inner step's moments do before a real write-back. `--chunks` repeats the stochastic one for CPU
pass sizes of 2**c entries (how `rounding.CHUNK` was chosen). A measurement of the rounding alone; `make bench
BENCH_ARGS="--methods rounding"` measures whole optimizer steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

SHAPES = {"cpu": (1024, 2816, 8, 16), "llama3-8b": (4096, 14336, 8, 32)}


def layer_shapes(hidden: int, mlp: int, kv_heads: int, heads: int) -> list[tuple[int, ...]]:
    kv = hidden // heads * kv_heads
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (mlp, hidden), (mlp, hidden),
            (hidden, mlp), (hidden,), (hidden,)]


def main(argv=None) -> None:
    from badam_hf.core import rounding
    from badam_hf.integrations.cpu_compute import cpu_description
    from badam_hf.core.rounding import SWITCH_STREAM, rounding_key, store_stochastic_many

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--shape", choices=list(SHAPES), default="cpu")
    p.add_argument("--chunks", default=None, help="comma-separated log2 CPU pass sizes to compare (default: CHUNK)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    masters = [torch.randn(s, generator=g) * 0.02 for s in layer_shapes(*SHAPES[args.shape])]
    weights = [m.to(torch.bfloat16) for m in masters]
    sweep = torch.zeros(80_000_000 // 4 * 4)  # 320 MB, larger than any cache

    def nearest():
        for w, m in zip(weights, masters):
            w.copy_(m)

    def stochastic():
        store_stochastic_many([(w, m, None, rounding_key(0, 1, i, SWITCH_STREAM))
                               for i, (w, m) in enumerate(zip(weights, masters))])

    def times(fn) -> tuple[float, float]:
        out = []
        for _ in range(args.repeats):
            sweep.add_(1.0)
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return min(out) * 1e3, statistics.median(out) * 1e3

    chunks = [int(c) for c in args.chunks.split(",")] if args.chunks else [rounding.CHUNK.bit_length() - 1]
    n = sum(m.numel() for m in masters)
    print(f"{cpu_description()}; {n / 1e6:.1f}M entries, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.1f}; ms, best / median of {args.repeats}, caches evicted before each")
    near = times(nearest)
    print(f"nearest: {near[0]:.2f} / {near[1]:.2f}")
    default = rounding.CHUNK
    try:
        for c in chunks:
            rounding.CHUNK = 1 << c
            st = times(stochastic)
            print(f"stochastic, CPU passes of 2^{c}: {st[0]:.2f} / {st[1]:.2f} "
                  f"(median ratio {st[1] / near[1]:.2f})")
    finally:
        rounding.CHUNK = default


if __name__ == "__main__":
    main()
