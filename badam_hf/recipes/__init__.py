"""Recipes: one YAML file per training run (model, data, BAdam settings, TrainingArguments).

    badam-hf train RECIPE.yaml [section.key=value ...]
    badam-hf train llama3-8b-alpaca-gpt4 training.output_dir=out training.max_steps=10

A recipe has four sections:

- `model`: `name_or_path`, `dtype` (bfloat16/float32/float16/auto), `attn_implementation`,
  `tokenizer` (a name or path, default `name_or_path`; `local` trains a small BPE tokenizer on the data),
  `from_config` + `config` (build a randomly initialised model from config values instead of loading
  weights; `config.model_type` names the architecture, otherwise `name_or_path`'s config is the base).
- `data`: `dataset` (a Hub name, a local .json/.jsonl file, or `builtin:demo`), `format`
  (`alpaca` or `superglue-<task>`), `template` (`alpaca`, or `chat` for the tokenizer's chat template), `cutoff_len`, `val_size`, `eval_dataset`
  (local file or Hub split for evaluation), `hub_config`, `split`, `max_samples`.
- `badam`: the flat keys of `BAdamConfig.from_flat` (switch_every, switch_mode, granularity, ...).
- `training`: any `transformers.TrainingArguments` field, verbatim.

The whole recipe (after overrides) is validated before any model or data is loaded: unknown sections or
keys, wrong types, bad choices and missing required fields are all collected into one `RecipeError` that
names each key and the file (one problem per line; the list in `RecipeError.problems`). Then `check_inputs`
looks for the model and data without loading them: a missing local path is a problem, a hub model that is
not cached a note ("will be downloaded"), or a problem under HF_HUB_OFFLINE=1. A repeated override key is
refused.

Shipped recipes live in the repository's top-level `recipes/` folder, which is installed as the package
data `badam_hf.recipes.shipped`: a checkout and an installed wheel both list them (see `discovery`).

Modules, each importing only those before it: `schema` (sections, key tables, TrainingArguments types),
`overrides` (section.key=value), `discovery` (where recipes come from) <- `validate` (`Recipe`,
`load_recipe`) <- `inputs` (are the model and data there: `check_inputs`) <- `builder` (model, tokenizer,
data, Trainer: `build`) <- `runner` (train, save, summary: `run`). None of them imports this package's `__init__`.
"""

from ..core.errors import RecipeError
from .builder import Built, Parts, build, build_parts
from .discovery import ENV_RECIPES_DIR, SHIPPED_PACKAGE, describe, recipe_dirs, resolve, shipped_dir, shipped_recipes
from .inputs import check_inputs
from .overrides import apply_overrides, parse_override
from .runner import print_summary, run
from .schema import DATA_KEYS, DTYPES, MODEL_KEYS, SECTIONS, TEMPLATES, TOP_LEVEL, Key
from .validate import Recipe, load_recipe, validate

__all__ = [
    "DATA_KEYS",
    "DTYPES",
    "ENV_RECIPES_DIR",
    "MODEL_KEYS",
    "SECTIONS",
    "SHIPPED_PACKAGE",
    "TEMPLATES",
    "TOP_LEVEL",
    "Built",
    "Parts",
    "Key",
    "Recipe",
    "RecipeError",
    "apply_overrides",
    "build",
    "build_parts",
    "check_inputs",
    "describe",
    "load_recipe",
    "parse_override",
    "print_summary",
    "recipe_dirs",
    "resolve",
    "run",
    "shipped_dir",
    "shipped_recipes",
    "validate",
]
