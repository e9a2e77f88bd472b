"""Where a validated recipe's model, tokenizer and data come from, checked without loading or downloading
anything: `check_inputs(recipe)` -> (problems, notes).

- A value that looks like a local path (starts with `./`, `../`, `/` or `~`, has more than one `/`, is not
  a valid hub name, or for data ends in `.json`/`.jsonl`) must exist: a missing one is a problem.
- A hub model name that is neither a local folder nor in the Hugging Face cache is a note ("will be
  downloaded from the hub"), or a problem under `HF_HUB_OFFLINE=1` (nothing can download it then). The
  cache is looked up offline (`huggingface_hub.try_to_load_from_cache`): never a network call.
- A hub dataset name is a note either way (the `datasets` library keeps a cache of its own).

`badam-hf train --check` prints both; the real run (`builder.build_parts`) refuses the problems before it
reads any data or weights. Imports `validate` of `badam_hf.recipes` (for `Recipe`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .validate import Recipe

LOCAL_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")
DATA_SUFFIXES = (".json", ".jsonl")
_TRUE = ("1", "on", "yes", "true")


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: read now, not when huggingface_hub was imported."""
    if any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache() -> Path:
    """The hub cache folder, from the environment as it is now (same variables as huggingface_hub)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def is_hub_name(value: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def looks_local(value: str, suffixes: tuple[str, ...] = ()) -> bool:
    """A path, not a hub name: `./x`, `/x`, `~/x`, `a/b/c` (a hub name has one `/` at most), a name the hub
    would refuse, or (for data) a .json/.jsonl file."""
    if value.startswith(LOCAL_PREFIXES) or value in (".", ".."):
        return True
    if (os.sep != "/" and os.sep in value) or value.count("/") > 1:
        return True
    if suffixes and value.lower().endswith(suffixes):
        return True
    return not is_hub_name(value)


def cached_model(name: str) -> str | None:
    """The cached config.json (or tokenizer_config.json) of a hub model, or None; reads the cache only."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("config.json", "tokenizer_config.json"):
        found = try_to_load_from_cache(name, filename, cache_dir=hub_cache())
        if isinstance(found, str):
            return found
    return None


def _check_model_source(key: str, value: str, where: str, problems: list[str], notes: list[str],
                        needs_config: bool) -> None:
    from ..core.errors import BAdamConfigError
    from ..integrations.pretrained import default_dir, gguf_path, is_known, is_prepared

    label = f"model.{key}={value!r}"
    if is_known(value):  # a prepared offline model by its short name
        if not is_prepared(default_dir(value)):
            try:
                gguf_path(value)
            except BAdamConfigError as e:
                problems.append(f"{where}: {label}: {e}")
        return
    path = Path(value).expanduser()
    if path.is_dir():
        if needs_config and not (path / "config.json").is_file():
            problems.append(f"{where}: {label} is a folder without config.json ({path.resolve()}), not a model folder.")
        return
    if path.exists():
        problems.append(f"{where}: {label} is a file ({path.resolve()}); give the model's folder or a hub name.")
        return
    if looks_local(value):
        problems.append(f"{where}: {label}: no such folder ({path.resolve()}).")
        return
    if cached_model(value) is not None:
        return
    if offline():
        problems.append(
            f"{where}: {label} is not a local folder and not in the Hugging Face cache ({hub_cache()}), and "
            "HF_HUB_OFFLINE=1 forbids downloading it; give a local folder, or download it first."
        )
    else:
        notes.append(f"{label} is not a local folder nor in the Hugging Face cache ({hub_cache()}): it will be "
                     "downloaded from the hub on the first run.")


def _check_data_file(key: str, value: str, where: str, problems: list[str]) -> bool:
    """True when `value` is a local data file (checked); False when it is a hub name or split."""
    path = Path(value).expanduser()
    if not (path.exists() or looks_local(value, DATA_SUFFIXES)):
        return False
    if path.is_dir():
        problems.append(f"{where}: data.{key}={value!r} is a folder ({path.resolve()}); give a .json or .jsonl file.")
    elif not path.is_file():
        problems.append(f"{where}: data.{key}={value!r}: no such file ({path.resolve()}).")
    return True


def check_inputs(recipe: Recipe) -> tuple[list[str], list[str]]:
    """(problems, notes) about the recipe's model, tokenizer and data sources; nothing is loaded."""
    where, m, d = str(recipe.path), recipe.model, recipe.data
    problems: list[str] = []
    notes: list[str] = []
    tokenizer = m["tokenizer"]
    model_type_given = bool(m["from_config"]) and "model_type" in (m["config"] or {})
    # name_or_path is read for the weights, for the base config of from_config, or for the tokenizer.
    if m["name_or_path"] and (not model_type_given or tokenizer is None):
        _check_model_source("name_or_path", m["name_or_path"], where, problems, notes,
                            needs_config=not model_type_given)
    if tokenizer not in (None, "local"):
        _check_model_source("tokenizer", tokenizer, where, problems, notes, needs_config=False)

    dataset = d["dataset"]
    if dataset != "builtin:demo" and not _check_data_file("dataset", dataset, where, problems):
        if is_hub_name(dataset):
            notes.append(f"data.dataset={dataset!r} is a hub dataset: `datasets` loads it from its cache or "
                         "downloads it from the hub" + (" (HF_HUB_OFFLINE=1: from its cache only)." if offline() else "."))
        else:
            problems.append(f"{where}: data.dataset={dataset!r} is neither a local .json/.jsonl file nor a hub name.")
    if d["eval_dataset"] is not None:
        _check_data_file("eval_dataset", d["eval_dataset"], where, problems)  # otherwise a split of data.dataset
    return problems, notes
