"""The `badam-hf` command (also `python -m badam_hf`).

    badam-hf estimate MODEL [--gpus N --batch B --seq S --no-gradient-checkpointing --granularity G]
"""

from __future__ import annotations

import argparse
import sys

from .config import GRANULARITIES


def _estimate(ns: argparse.Namespace) -> int:
    from .memory import estimate, format_table

    try:
        info, rows = estimate(
            ns.model,
            gpus=ns.gpus,
            batch=ns.batch,
            seq=ns.seq,
            gradient_checkpointing=ns.gradient_checkpointing,
            granularity=ns.granularity,
            lora_rank=ns.lora_rank,
        )
    except ValueError as e:
        print(f"badam-hf estimate: {e}", file=sys.stderr)
        return 2
    print(format_table(info, rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .memory import BUILTIN_SHAPES

    parser = argparse.ArgumentParser(prog="badam-hf", description="BAdam for Hugging Face Trainer.")
    sub = parser.add_subparsers(dest="command", required=True)
    est = sub.add_parser(
        "estimate",
        help="memory per method (Adam, LoRA, LOMO, BAdam) for a model, without loading weights",
        description="Estimate training memory from a model config (weights are never allocated).",
    )
    est.add_argument("model", help=f"built-in shape ({', '.join(BUILTIN_SHAPES)}), a local config.json or model folder")
    est.add_argument("--gpus", type=int, default=1, help="GPUs the weights and states are sharded over")
    est.add_argument("--batch", type=int, default=2, help="per-GPU batch size")
    est.add_argument("--seq", type=int, default=728, help="sequence length")
    est.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    est.add_argument("--granularity", choices=GRANULARITIES, default="layer")
    est.add_argument("--lora-rank", type=int, default=8)
    est.set_defaults(func=_estimate)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
