"""Validation: a recipe file (after overrides) -> `Recipe`, or one `RecipeError` that lists every problem.

Nothing is loaded here: no model, no tokenizer, no data. Every section is checked in full even after a
problem was found (unknown sections and keys, wrong types, bad choices, BAdam settings, training
arguments), so `badam-hf train RECIPE --check` reports all of them in one run: the error's message holds
one problem per line and its `problems` attribute the list. A rule that combines several keys only runs
when those keys passed their own checks, so one mistake is not reported twice.

Imports `schema`, `overrides` and `discovery` of `badam_hf.recipes`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from pathlib import Path

import yaml

from ..core.config import BAdamConfig
from ..core.hf_features import checkpointing_aliases
from ..core.errors import BAdamConfigError, RecipeError
from .discovery import resolve
from .overrides import apply_overrides
from .schema import (
    DATA_KEYS,
    MODEL_KEYS,
    SECTIONS,
    TOP_LEVEL,
    Key,
    _matches,
    _numbers_from_strings,
    _training_fields,
    _type_names,
)


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
        from ..data.superglue import MULTIPLE_CHOICE

        return "multiple-choice" if fmt.split("-", 1)[1] in MULTIPLE_CHOICE else "sequence-classification"


class _Problems(list):
    """The problems found so far, each a full message starting with the recipe's file."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where

    def add(self, message: str) -> None:
        self.append(f"{self.where}: {message}")


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
    """The checked `Recipe`; raises one `RecipeError` listing every problem (see the module docstring)."""
    problems = _Problems(where)
    raw = copy.deepcopy(raw)
    unknown = sorted(set(raw) - set(SECTIONS) - set(TOP_LEVEL))
    if unknown:
        problems.add(
            f"unknown section(s) {', '.join(map(repr, unknown))}; a recipe has {', '.join(SECTIONS)} "
            "(and an optional description)."
        )
    desc = raw.get("description", "")
    if desc is not None and not isinstance(desc, str):
        problems.add("description must be a string.")
        desc = ""
    sections: dict[str, dict | None] = {}
    for name in SECTIONS:
        value = {} if raw.get(name) is None else raw[name]
        if not isinstance(value, dict):
            problems.add(f"section {name!r} must be a mapping of keys to values, got {value!r}.")
            value = None  # not checked further
        sections[name] = value
    for name in ("model", "data", "training"):
        if sections[name] is not None:
            _numbers_from_strings(sections[name])

    model = _check_model(sections["model"], problems) if sections["model"] is not None else None
    data, data_bad = _check_data(sections["data"], problems) if sections["data"] is not None else (None, set())
    badam, badam_flat = _check_badam(sections["badam"], problems) if sections["badam"] is not None else (None, {})
    training = None
    if sections["training"] is not None:
        training = _check_training(sections["training"], None if data_bad & {"val_size", "eval_dataset"} else data,
                                   problems)
    if problems:
        raise RecipeError("\n".join(problems), list(problems))
    return Recipe(path=path or Path(where), model=model, data=data, badam=badam, badam_flat=badam_flat,
                  training=training, description=desc or "")


def _check_section(name: str, section: dict, keys: dict[str, Key], problems: _Problems) -> tuple[dict, set[str]]:
    """(the section's values with defaults filled in, the keys that have a problem: these hold the default)."""
    unknown = sorted(set(section) - set(keys))
    if unknown:
        problems.add(
            f"unknown key(s) {', '.join(map(repr, unknown))} in section {name!r}; valid keys are: "
            f"{', '.join(keys)}."
        )
    out: dict = {}
    bad: set[str] = set()
    for key, spec in keys.items():
        out[key] = copy.deepcopy(spec.default)
        if key not in section:
            if spec.required:
                problems.add(f"{name}.{key} is required.")
                bad.add(key)
            continue
        value = section[key]
        if value is None and type(None) not in spec.types:
            if spec.required:
                problems.add(f"{name}.{key} is required.")
                bad.add(key)
                continue
            value = copy.deepcopy(spec.default)
        elif not _matches(value, spec.types):
            problems.add(f"{name}.{key}={value!r} has the wrong type; expected {_type_names(spec.types)}.")
            bad.add(key)
            continue
        if spec.choices is not None and value not in spec.choices:
            problems.add(f"{name}.{key}={value!r} is not valid; choose one of {', '.join(spec.choices)}.")
            bad.add(key)
            continue
        out[key] = value
    return out, bad


def _check_model(section: dict, problems: _Problems) -> dict:
    model, bad = _check_section("model", section, MODEL_KEYS, problems)
    if not bad & {"from_config", "name_or_path"} and not model["from_config"] and not model["name_or_path"]:
        problems.add("model.name_or_path is required (or set model.from_config: true with model.config).")
        bad.add("name_or_path")
    if not bad & {"from_config", "name_or_path", "config"}:
        if model["from_config"]:
            if "model_type" not in (model["config"] or {}) and not model["name_or_path"]:
                problems.add("model.from_config needs model.config.model_type or model.name_or_path.")
    if not bad & {"from_config", "config"} and not model["from_config"] and model["config"]:
        problems.add("model.config is only used with model.from_config: true.")
    if not bad & {"tokenizer", "name_or_path"} and model["tokenizer"] is None and not model["name_or_path"]:
        problems.add("model.tokenizer is required when model.name_or_path is not set (`local` trains one).")
    return model


def _check_data(section: dict, problems: _Problems) -> tuple[dict, set[str]]:
    from ..data.superglue import TASKS

    data, bad = _check_section("data", section, DATA_KEYS, problems)
    fmt = data["format"]
    if "format" not in bad and fmt != "alpaca" and not (fmt.startswith("superglue-") and fmt.split("-", 1)[1] in TASKS):
        problems.add(
            f"data.format={fmt!r} is not valid; choose alpaca or one of "
            f"{', '.join('superglue-' + t for t in TASKS)}."
        )
        bad.add("format")
    if "cutoff_len" not in bad and data["cutoff_len"] < 8:
        problems.add(f"data.cutoff_len={data['cutoff_len']} is too small (at least 8).")
        bad.add("cutoff_len")
    if "val_size" not in bad and not 0 <= data["val_size"] < 1:
        problems.add(f"data.val_size={data['val_size']} must be a fraction in [0, 1).")
        bad.add("val_size")
    if "max_samples" not in bad and data["max_samples"] is not None and data["max_samples"] < 1:
        problems.add("data.max_samples must be >= 1.")
        bad.add("max_samples")
    return data, bad


def _check_badam(section: dict, problems: _Problems) -> tuple[BAdamConfig | None, dict]:
    """`BAdamConfig.from_flat` stops at its first problem: on a failure, each key is tried on its own (and
    the unknown keys together) to find them all; a rule between keys shows when every key passes alone."""
    flat = dict(section)
    for k, v in flat.items():
        if isinstance(v, list):
            flat[k] = [str(x) for x in v]
    source = "section 'badam'"  # the messages that name it get the file in front, like every other problem
    try:
        return BAdamConfig.from_flat(flat, source=source), flat
    except (BAdamConfigError, TypeError) as e:
        first = e
    known = BAdamConfig.flat_fields()
    unknown = {k: v for k, v in flat.items() if k not in known}
    parts = ([unknown] if unknown else []) + [{k: v} for k, v in flat.items() if k in known]
    found = []
    for part in parts:
        try:
            BAdamConfig.from_flat(part, source=source)
        except (BAdamConfigError, TypeError) as e:
            found.append(e)
    for e in found or [first]:
        if isinstance(e, TypeError):
            problems.add(f"section 'badam': {e}")
        elif source in str(e):
            problems.add(str(e))
        else:
            problems.add(f"badam.{e}")
    return None, flat


def _checkpointing_under_its_installed_name(training: dict, problems: _Problems) -> dict:
    """`gradient_checkpointing` and `activation_checkpointing` (and their `_kwargs`) are one setting under two
    names, the newer one missing from older transformers: a recipe may use either on every supported release."""
    out = {}
    for key, value in training.items():
        name = checkpointing_aliases().get(key, key)
        if name in out and out[name] != value:
            problems.add(f"training.{key}={value!r} contradicts another name of the same setting "
                         f"({name}={out[name]!r}); give it once.")
        out[name] = value
    return out


def _check_training(section: dict, data: dict | None, problems: _Problems) -> dict:
    """The `training` section (TrainingArguments fields verbatim). `data` is None when its evaluation keys
    have problems of their own (the eval-data rule is skipped then)."""
    training = _checkpointing_under_its_installed_name(dict(section), problems)
    fields = _training_fields()
    unknown = sorted(set(training) - set(fields))
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, fields, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        problems.add(
            f"unknown key(s) in section 'training': {', '.join(hints)}; it takes "
            "transformers.TrainingArguments fields verbatim."
        )
    bad = set(unknown)
    for k, v in list(training.items()):
        if k in bad:
            continue
        allowed = fields[k]
        if v is False and allowed is not None and str in allowed and bool not in allowed:
            # YAML 1.1 reads a bare `no` as false: `eval_strategy: no` means the string "no".
            training[k] = v = "no"
        if allowed is not None and not _matches(v, allowed):
            problems.add(f"training.{k}={v!r} has the wrong type; expected {_type_names(allowed)}.")
            bad.add(k)
    if "optim" not in bad and training.get("optim") not in (None, "badam"):
        problems.add(f"training.optim={training['optim']!r}: a recipe always trains with BAdam; drop the key.")
    training.pop("optim", None)
    if "optim_args" not in bad and training.get("optim_args"):
        problems.add("training.optim_args: put BAdam settings in the 'badam' section instead.")
    if "output_dir" not in bad and not training.get("output_dir"):
        problems.add("training.output_dir is required (where the model is saved).")
    evaluating = training.get("eval_strategy", "no") not in ("no", None)
    if "eval_strategy" not in bad and data is not None and evaluating:
        if not (data["val_size"] > 0 or data["eval_dataset"] is not None):
            problems.add(
                f"training.eval_strategy={training['eval_strategy']!r} but there is no evaluation data; "
                "set data.val_size or data.eval_dataset."
            )
    return training
