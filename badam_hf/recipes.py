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

The whole recipe (after overrides) is validated before any model or data is loaded: an unknown
section or key, a wrong type or a missing required field raises `RecipeError` naming the key and file.

Shipped recipes live in the repository's top-level `recipes/` folder, next to the `badam_hf` package:
a repository checkout with an editable install (`make install`) is the supported layout.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .config import BAdamConfig, BAdamConfigError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
ENV_RECIPES_DIR = "BADAM_HF_RECIPES"  # optional extra folder searched first
DTYPES = ("bfloat16", "float32", "float16", "auto")
TEMPLATES = ("alpaca", "chat")


class RecipeError(ValueError):
    """A recipe cannot be used: names the key and the file."""


@dataclasses.dataclass(frozen=True)
class Key:
    types: tuple  # allowed Python types (int also accepted where float is)
    default: Any = None
    required: bool = False
    choices: tuple | None = None


MODEL_KEYS = {
    "name_or_path": Key((str,)),
    "dtype": Key((str,), "bfloat16", choices=DTYPES),
    "attn_implementation": Key((str, type(None)), None),
    "tokenizer": Key((str, type(None)), None),
    "tokenizer_vocab_size": Key((int,), 1000),
    "from_config": Key((bool,), False),
    "config": Key((dict,), None),
    "trust_remote_code": Key((bool,), False),
}
DATA_KEYS = {
    "dataset": Key((str,), required=True),
    "format": Key((str,), required=True),
    "template": Key((str,), "alpaca", choices=TEMPLATES),
    "cutoff_len": Key((int,), 512),
    "val_size": Key((float, int), 0.0),
    "eval_dataset": Key((str, type(None)), None),
    "hub_config": Key((str, type(None)), None),
    "split": Key((str,), "train"),
    "max_samples": Key((int, type(None)), None),
    "seed": Key((int,), 42),
}
SECTIONS = ("model", "data", "badam", "training")
TOP_LEVEL = {"description": (str,)}


def _type_names(types_: tuple) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
             list: "a list", type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in types_)


def _matches(value: Any, types_: tuple) -> bool:
    if isinstance(value, bool):
        return bool in types_
    if isinstance(value, int) and float in types_:
        return True
    return isinstance(value, types_)


# --- TrainingArguments field types ---


def _training_fields() -> dict[str, tuple]:
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    out = {}
    for f in dataclasses.fields(TrainingArguments):
        if not f.init:
            continue
        out[f.name] = _allowed_types(hints.get(f.name, Any))
    return out


def _allowed_types(hint) -> tuple | None:
    """Python types a YAML value may have for this annotation; None when anything goes."""
    if hint is Any:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        out: list = []
        for arg in typing.get_args(hint):
            sub = _allowed_types(arg)
            if sub is None:
                return None
            out.extend(sub)
        return tuple(dict.fromkeys(out))
    if origin in (list, tuple, typing.List):
        return (list,)
    if origin is dict:
        return (dict,)
    if hint in (int, float, bool, str, dict, list, type(None)):
        return (hint,)
    if isinstance(hint, type) and issubclass(hint, str):  # str enums (SchedulerType, IntervalStrategy, ...)
        return (str,)
    return None


# --- loading ---


def shipped_recipes() -> dict[str, Path]:
    """Name -> path of every shipped recipe (`$BADAM_HF_RECIPES` first, then the repo's `recipes/`)."""
    out: dict[str, Path] = {}
    dirs = [Path(os.environ[ENV_RECIPES_DIR])] if os.environ.get(ENV_RECIPES_DIR) else []
    for d in dirs + [RECIPES_DIR]:
        if d.is_dir():
            for p in sorted(d.glob("*.yaml")):
                out.setdefault(p.stem, p)
    return dict(sorted(out.items()))


def describe(path: Path) -> str:
    """The recipe's one-line description: its `description:` key, else the header comment's first line."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("description"), str):
        return data["description"].strip().splitlines()[0]
    for line in text.splitlines():
        if line.startswith("#"):
            stripped = line.lstrip("#").strip()
            if stripped:
                return stripped
        elif line.strip():
            break
    return ""


def resolve(name_or_path: str) -> Path:
    """A recipe file path, or a shipped recipe's name (with or without `.yaml`)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    shipped = shipped_recipes()
    stem = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    if os.sep not in name_or_path and stem in shipped:
        return shipped[stem]
    raise RecipeError(
        f"no recipe file {name_or_path!r} and no shipped recipe of that name; shipped recipes: "
        f"{', '.join(shipped) or '(none found in ' + str(RECIPES_DIR) + ')'}."
    )


def parse_override(item: str, source: str = "command line") -> tuple[list[str], Any]:
    """`training.learning_rate=2e-5` -> (['training', 'learning_rate'], 2e-05); the value is YAML."""
    if "=" not in item:
        raise RecipeError(f"override {item!r} on the {source} is not section.key=value.")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise RecipeError(f"override {item!r} on the {source}: the key must be dotted, e.g. training.learning_rate=1e-5.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"override {item!r}: cannot read the value as YAML ({e}).") from None
    return parts, value


def apply_overrides(recipe: dict, overrides: list[str]) -> dict:
    recipe = copy.deepcopy(recipe)
    for item in overrides:
        parts, value = parse_override(item)
        node = recipe
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section.")
            node = child
        node[parts[-1]] = value
    return recipe


def _numbers_from_strings(section: dict) -> None:
    """YAML 1.1 (PyYAML) reads `1e-5` (no dot) as a string; turn such scientific literals into floats."""
    for k, v in list(section.items()):
        if isinstance(v, dict):
            _numbers_from_strings(v)
        elif isinstance(v, str):
            s = v.strip()
            if s and (s[0].isdigit() or s[0] in "+-.") and ("e" in s.lower()):
                try:
                    section[k] = float(s)
                except ValueError:
                    pass


@dataclasses.dataclass
class Recipe:
    path: Path
    model: dict
    data: dict
    badam: BAdamConfig
    badam_flat: dict
    training: dict
    description: str = ""

    @property
    def task(self) -> str:
        """`causal-lm`, `sequence-classification` or `multiple-choice`, from the data format."""
        fmt = self.data["format"]
        if fmt == "alpaca":
            return "causal-lm"
        from .superglue import MULTIPLE_CHOICE

        return "multiple-choice" if fmt.split("-", 1)[1] in MULTIPLE_CHOICE else "sequence-classification"


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe. Loads no model and no data."""
    path = resolve(str(name_or_path))
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{where} is not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe is a mapping with sections {', '.join(SECTIONS)}.")
    raw = apply_overrides(raw, list(overrides or []))
    return validate(raw, where, path)


def validate(raw: dict, where: str = "<recipe>", path: Path | None = None) -> Recipe:
    from .superglue import TASKS

    raw = copy.deepcopy(raw)
    unknown = sorted(set(raw) - set(SECTIONS) - set(TOP_LEVEL))
    if unknown:
        raise RecipeError(
            f"{where}: unknown section(s) {', '.join(map(repr, unknown))}; a recipe has {', '.join(SECTIONS)} "
            "(and an optional description)."
        )
    desc = raw.get("description", "")
    if desc is not None and not isinstance(desc, str):
        raise RecipeError(f"{where}: description must be a string.")
    for name in SECTIONS:
        if raw.get(name) is None:
            raw[name] = {}
        if not isinstance(raw[name], dict):
            raise RecipeError(f"{where}: section {name!r} must be a mapping of keys to values, got {raw[name]!r}.")

    for name in ("model", "data", "training"):
        _numbers_from_strings(raw[name])
    model = _check_section("model", raw["model"], MODEL_KEYS, where)
    if not model["from_config"] and not model["name_or_path"]:
        raise RecipeError(f"{where}: model.name_or_path is required (or set model.from_config: true with model.config).")
    if model["from_config"]:
        cfg = model["config"] or {}
        if "model_type" not in cfg and not model["name_or_path"]:
            raise RecipeError(f"{where}: model.from_config needs model.config.model_type or model.name_or_path.")
    elif model["config"]:
        raise RecipeError(f"{where}: model.config is only used with model.from_config: true.")
    if model["tokenizer"] is None and not model["name_or_path"]:
        raise RecipeError(f"{where}: model.tokenizer is required when model.name_or_path is not set (`local` trains one).")

    data = _check_section("data", raw["data"], DATA_KEYS, where)
    fmt = data["format"]
    if fmt != "alpaca" and not (fmt.startswith("superglue-") and fmt.split("-", 1)[1] in TASKS):
        raise RecipeError(
            f"{where}: data.format={fmt!r} is not valid; choose alpaca or one of "
            f"{', '.join('superglue-' + t for t in TASKS)}."
        )
    if data["cutoff_len"] < 8:
        raise RecipeError(f"{where}: data.cutoff_len={data['cutoff_len']} is too small (at least 8).")
    if not 0 <= data["val_size"] < 1:
        raise RecipeError(f"{where}: data.val_size={data['val_size']} must be a fraction in [0, 1).")
    if data["max_samples"] is not None and data["max_samples"] < 1:
        raise RecipeError(f"{where}: data.max_samples must be >= 1.")

    badam_flat = dict(raw["badam"])
    for k, v in badam_flat.items():
        if isinstance(v, list):
            badam_flat[k] = [str(x) for x in v]
    try:
        badam = BAdamConfig.from_flat(badam_flat, source=f"section 'badam' of {where}")
    except BAdamConfigError as e:
        msg = str(e)
        if where not in msg:
            msg = f"{where}: badam.{msg}"
        raise RecipeError(msg) from None
    except TypeError as e:
        raise RecipeError(f"{where}: section 'badam': {e}") from None

    training = dict(raw["training"])
    fields = _training_fields()
    unknown = sorted(set(training) - set(fields))
    if unknown:
        import difflib

        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, fields, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise RecipeError(
            f"{where}: unknown key(s) in section 'training': {', '.join(hints)}; it takes "
            "transformers.TrainingArguments fields verbatim."
        )
    for k, v in list(training.items()):
        allowed = fields[k]
        if v is False and allowed is not None and str in allowed and bool not in allowed:
            # YAML 1.1 reads a bare `no` as false: `eval_strategy: no` means the string "no".
            training[k] = v = "no"
        if allowed is not None and not _matches(v, allowed):
            raise RecipeError(f"{where}: training.{k}={v!r} has the wrong type; expected {_type_names(allowed)}.")
    if training.get("optim") not in (None, "badam"):
        raise RecipeError(f"{where}: training.optim={training['optim']!r}: a recipe always trains with BAdam; drop the key.")
    training.pop("optim", None)
    if training.get("optim_args"):
        raise RecipeError(f"{where}: training.optim_args: put BAdam settings in the 'badam' section instead.")
    if not training.get("output_dir"):
        raise RecipeError(f"{where}: training.output_dir is required (where the model is saved).")
    evaluating = training.get("eval_strategy", "no") not in ("no", None)
    has_eval = data["val_size"] > 0 or data["eval_dataset"] is not None
    if evaluating and not has_eval:
        raise RecipeError(
            f"{where}: training.eval_strategy={training['eval_strategy']!r} but there is no evaluation data; "
            "set data.val_size or data.eval_dataset."
        )
    return Recipe(path=path or Path(where), model=model, data=data, badam=badam, badam_flat=badam_flat,
                  training=training, description=desc or "")


def _check_section(name: str, section: dict, keys: dict[str, Key], where: str) -> dict:
    unknown = sorted(set(section) - set(keys))
    if unknown:
        raise RecipeError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))} in section {name!r}; valid keys are: "
            f"{', '.join(keys)}."
        )
    out = {}
    for key, spec in keys.items():
        if key not in section:
            if spec.required:
                raise RecipeError(f"{where}: {name}.{key} is required.")
            out[key] = copy.deepcopy(spec.default)
            continue
        value = section[key]
        if value is None and type(None) not in spec.types:
            if spec.required:
                raise RecipeError(f"{where}: {name}.{key} is required.")
            value = copy.deepcopy(spec.default)
        elif not _matches(value, spec.types):
            raise RecipeError(f"{where}: {name}.{key}={value!r} has the wrong type; expected {_type_names(spec.types)}.")
        if spec.choices is not None and value not in spec.choices:
            raise RecipeError(f"{where}: {name}.{key}={value!r} is not valid; choose one of {', '.join(spec.choices)}.")
        out[key] = value
    return out


# --- building ---


def _load_records(spec: str, *, split: str, hub_config: str | None, where: str, key: str) -> list[dict]:
    """Records from a local .json/.jsonl file or, for names that are not files, `datasets.load_dataset`."""
    import json

    p = Path(spec).expanduser()
    if spec == "builtin:demo":
        from .demo import make_synthetic_records

        return make_synthetic_records(400, 0)
    if p.suffix in (".json", ".jsonl") or p.exists():
        if not p.is_file():
            raise RecipeError(f"{where}: data.{key}={spec!r}: no such file.")
        text = p.read_text(encoding="utf-8")
        try:
            if text.lstrip().startswith("["):
                records = json.loads(text)
            else:
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise RecipeError(f"{where}: data.{key}={spec!r} is not JSON or JSON Lines: {e}") from None
        if not isinstance(records, list):
            raise RecipeError(f"{where}: data.{key}={spec!r} must hold a list of records.")
        return records
    import datasets  # a Hub name: only for users, never in the tests

    ds = datasets.load_dataset(spec, hub_config, split=split)
    return [dict(r) for r in ds]


@dataclasses.dataclass
class Built:
    trainer: Any
    tokenizer: Any
    train_size: int
    eval_size: int


def _dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def build(recipe: Recipe) -> Built:
    """Tokenizer, model, datasets and a `BAdamTrainer` from a validated recipe."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForMultipleChoice,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainingArguments,
    )

    from . import superglue
    from .data import SFTCollator, SFTDataset, alpaca_texts, build_local_tokenizer, tokenize_sft, train_val_split
    from .trainer import BAdamTrainer

    where, m, d = str(recipe.path), recipe.model, recipe.data
    task = recipe.task
    sg_task = None if d["format"] == "alpaca" else d["format"].split("-", 1)[1]
    # TrainingArguments checks the machine (bf16 without a GPU, ...) and cross-field rules: fail before loading.
    try:
        args = TrainingArguments(**recipe.training)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{where}: section 'training' is not usable here: {e}") from None
    # --- data (records first: a local tokenizer is trained on them) ---
    records = _load_records(d["dataset"], split=d["split"], hub_config=d["hub_config"], where=where, key="dataset")
    if d["max_samples"] is not None:
        records = records[: d["max_samples"]]
    if not records:
        raise RecipeError(f"{where}: data.dataset={d['dataset']!r} holds no records.")
    eval_records: list[dict] = []
    if d["format"] == "alpaca":
        from .data import format_alpaca

        for i, r in enumerate(records):
            try:
                format_alpaca(r, i)
            except ValueError as e:
                raise RecipeError(f"{d['dataset']}: {e}") from None
        texts = lambda recs: alpaca_texts(recs)  # noqa: E731
    else:
        records = superglue.prepare(sg_task, records)

        def texts(recs):
            out = []
            for i, r in enumerate(recs):
                inputs, _ = superglue.format_record(sg_task, r, i)
                for pair in inputs if isinstance(inputs, list) else [inputs]:
                    out.extend(pair)
            return out

    if d["eval_dataset"] is not None:
        ev = d["eval_dataset"]
        if Path(ev).suffix in (".json", ".jsonl") or Path(ev).expanduser().exists():
            eval_records = _load_records(ev, split="", hub_config=None, where=where, key="eval_dataset")
        else:  # a split of the Hub dataset, e.g. `validation`
            eval_records = _load_records(d["dataset"], split=ev, hub_config=d["hub_config"], where=where, key="dataset")
        if sg_task is not None:
            eval_records = superglue.prepare(sg_task, eval_records)
    elif d["val_size"] > 0:
        records, eval_records = train_val_split(records, d["val_size"], d["seed"])

    # --- tokenizer ---
    if (m["tokenizer"] or "") == "local":
        try:
            tokenizer = build_local_tokenizer(texts(records) + texts(eval_records), m["tokenizer_vocab_size"])
        except ValueError as e:
            raise RecipeError(f"{d['dataset']}: {e}") from None
    else:
        tokenizer = AutoTokenizer.from_pretrained(m["tokenizer"] or m["name_or_path"],
                                                  trust_remote_code=m["trust_remote_code"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    # --- features ---
    try:
        if d["format"] == "alpaca":
            # A chat template writes its own BOS.
            add_bos = tokenizer.bos_token_id is not None and d["template"] == "alpaca"
            sft = dict(add_bos=add_bos, template=d["template"])
            train_ds = SFTDataset(tokenize_sft(records, tokenizer, d["cutoff_len"], **sft))
            eval_ds = SFTDataset(tokenize_sft(eval_records, tokenizer, d["cutoff_len"], **sft)) if eval_records else None
            collator = SFTCollator(tokenizer.pad_token_id)
            compute_metrics = None
        else:
            train_ds = superglue.tokenize(sg_task, records, tokenizer, d["cutoff_len"])
            eval_ds = superglue.tokenize(sg_task, eval_records, tokenizer, d["cutoff_len"]) if eval_records else None
            collator = superglue.SuperGlueCollator(tokenizer.pad_token_id, multiple_choice=task == "multiple-choice")
            groups = [superglue.multirc_group(r, i) for i, r in enumerate(eval_records)] if sg_task == "multirc" else None
            compute_metrics = superglue.compute_metrics_fn(sg_task, groups) if eval_records else None
    except ValueError as e:
        raise RecipeError(f"{d['dataset']}: {e}") from None

    # --- model ---
    cls = {"causal-lm": AutoModelForCausalLM, "sequence-classification": AutoModelForSequenceClassification,
           "multiple-choice": AutoModelForMultipleChoice}[task]
    extra: dict[str, Any] = {}
    if task == "sequence-classification":
        extra["num_labels"] = 2
    if m["attn_implementation"]:
        extra["attn_implementation"] = m["attn_implementation"]
    if m["from_config"]:
        cfg_values = dict(m["config"] or {})
        if (m["tokenizer"] or "") == "local":
            cfg_values.setdefault("vocab_size", len(tokenizer))
            for name in ("pad", "bos", "eos"):
                cfg_values.setdefault(f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
        if "model_type" in cfg_values:
            config = AutoConfig.for_model(cfg_values.pop("model_type"), **cfg_values, **extra)
        else:
            config = AutoConfig.from_pretrained(m["name_or_path"], **cfg_values, **extra)
        dtype = _dtype(m["dtype"])
        model = cls.from_config(config, dtype=torch.float32 if dtype == "auto" else dtype,
                                trust_remote_code=m["trust_remote_code"])
    else:
        model = cls.from_pretrained(m["name_or_path"], dtype=_dtype(m["dtype"]),
                                    trust_remote_code=m["trust_remote_code"], **extra)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    trainer = BAdamTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        badam_config=recipe.badam,
    )
    return Built(trainer=trainer, tokenizer=tokenizer, train_size=len(train_ds), eval_size=len(eval_ds or []))


def _peak_memory() -> str:
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA, max allocated)"
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024
    return f"{peak_bytes / 2**30:.2f} GiB (peak RSS of this process)"


def save_final_model(trainer) -> None:
    """`trainer.save_model()`, which under FSDP with a sharded state dict (the 70B config's) silently writes
    nothing: gather the full weights for this one final save; checkpoints during training stay sharded."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if trainer.is_fsdp_enabled and plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model()


def run(recipe: Recipe, out=None) -> dict:
    """Build and train; save the model to `training.output_dir`; print and return a summary."""
    from .trainer import unwrap_optimizer

    out = sys.stdout if out is None else out
    start = time.perf_counter()
    built = build(recipe)
    trainer = built.trainer
    result = trainer.train()
    save_final_model(trainer)
    metrics = {}
    if built.eval_size and trainer.args.eval_strategy != "no":
        metrics = trainer.evaluate()
    elapsed = time.perf_counter() - start
    opt = unwrap_optimizer(trainer.optimizer)
    steps = trainer.state.global_step
    blocks = sorted({opt.schedule.block_at(s) for s in range(steps)}) if opt is not None else []
    names = [opt.partition.blocks[b].name for b in blocks] if opt is not None else []
    summary = {
        "steps": steps,
        "blocks_visited": blocks,
        "block_names": names,
        "num_blocks": opt.num_blocks if opt is not None else None,
        "time_s": elapsed,
        "peak_memory": _peak_memory(),
        "output_dir": str(Path(trainer.args.output_dir).resolve()),
        "train_loss": result.training_loss,
        "train_examples": built.train_size,
        "eval_examples": built.eval_size,
        "eval_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }
    if not trainer.is_world_process_zero():
        return summary  # one summary per run, not one per process
    shown = ", ".join(names) if len(names) <= 6 else f"{', '.join(names[:3])}, ..., {names[-1]}"
    print(f"\nbadam-hf train: {recipe.path}", file=out)
    print(f"  steps:          {steps}", file=out)
    print(f"  blocks visited: {len(blocks)} of {summary['num_blocks']} ({shown})", file=out)
    print(f"  train loss:     {result.training_loss:.4f}", file=out)
    print(f"  time:           {elapsed:.1f} s", file=out)
    print(f"  peak memory:    {summary['peak_memory']}", file=out)
    if summary["eval_metrics"]:
        print("  eval:           " + ", ".join(f"{k}={v:.4g}" for k, v in summary["eval_metrics"].items()), file=out)
    print(f"  model saved to: {summary['output_dir']}", file=out)
    return summary
