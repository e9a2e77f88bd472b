"""Building: a validated `Recipe` -> tokenizer, model, datasets and a `BAdamTrainer` (`build`, `Built`).

`TrainingArguments` is built first (it checks the machine and rules between fields), so such a problem is
reported before any data or weights are read, and so is a missing local model or data path (`inputs`); a
model that fails to load is one `RecipeError` line. Imports `validate` (for `Recipe`) and `inputs` of
`badam_hf.recipes`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..core.errors import RecipeError
from .inputs import check_inputs
from .validate import Recipe


def _one_line(e: BaseException, limit: int = 400) -> str:
    """`Type: message` on one line (whitespace collapsed), cut at `limit` characters."""
    text = " ".join(str(e).split()) or "(no message)"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}"


def _load_records(spec: str, *, split: str, hub_config: str | None, where: str, key: str) -> list[dict]:
    """Records from a local .json/.jsonl file or, for names that are not files, `datasets.load_dataset`."""
    import json

    p = Path(spec).expanduser()
    if spec == "builtin:demo":
        from ..data.synthetic import make_synthetic_records

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
class Parts:
    """What a recipe builds before the Trainer: the pieces any Trainer (BAdam's or a baseline's) takes."""

    model: Any
    args: Any
    train_dataset: Any
    eval_dataset: Any
    data_collator: Any
    tokenizer: Any
    compute_metrics: Any

    def trainer_kwargs(self) -> dict:
        return dict(model=self.model, args=self.args, train_dataset=self.train_dataset,
                    eval_dataset=self.eval_dataset, data_collator=self.data_collator,
                    processing_class=self.tokenizer, compute_metrics=self.compute_metrics)


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
    from ..integrations.trainer import BAdamTrainer

    parts = build_parts(recipe)
    trainer = BAdamTrainer(**parts.trainer_kwargs(), badam_config=recipe.badam)
    return Built(trainer=trainer, tokenizer=parts.tokenizer, train_size=len(parts.train_dataset),
                 eval_size=len(parts.eval_dataset or []))


def build_parts(recipe: Recipe) -> Parts:
    """Tokenizer, model, datasets, collator and TrainingArguments from a validated recipe (no Trainer yet)."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForMultipleChoice,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainingArguments,
    )

    from ..data import superglue
    from ..data.sft import SFTCollator, SFTDataset, alpaca_texts, build_local_tokenizer, tokenize_sft, train_val_split
    from ..integrations.pretrained import resolve_model

    where, m, d = str(recipe.path), recipe.model, recipe.data
    task = recipe.task
    sg_task = None if d["format"] == "alpaca" else d["format"].split("-", 1)[1]
    # TrainingArguments checks the machine (bf16 without a GPU, ...) and cross-field rules: fail before loading.
    try:
        args = TrainingArguments(**recipe.training)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{where}: section 'training' is not usable here: {e}") from None
    # A missing local model or data path (or a hub model under HF_HUB_OFFLINE=1 that is not cached): refused
    # before anything is read, like `badam-hf train --check` reports it.
    problems, _ = check_inputs(recipe)
    if problems:
        raise RecipeError("\n".join(problems), problems)
    # --- data (records first: a local tokenizer is trained on them) ---
    records = _load_records(d["dataset"], split=d["split"], hub_config=d["hub_config"], where=where, key="dataset")
    if d["max_samples"] is not None:
        records = records[: d["max_samples"]]
    if not records:
        raise RecipeError(f"{where}: data.dataset={d['dataset']!r} holds no records.")
    eval_records: list[dict] = []
    if d["format"] == "alpaca":
        from ..data.sft import format_alpaca

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
    def name_or_path() -> str:
        # A prepared offline model (e.g. smollm2-135m-instruct) by its short name: prepared on first use, and
        # only when something is read from it.
        return resolve_model(m["name_or_path"])

    def loading(key: str, load):
        """`load()`, with a failure (hub error, bad folder, unknown architecture, ...) turned into one
        RecipeError line naming the recipe key, without the chained traceback."""
        try:
            return load()
        except Exception as e:  # noqa: BLE001 - every failure of a load is reported the same way
            raise RecipeError(f"{where}: model.{key}={m[key]!r} could not be loaded: {_one_line(e)}") from None

    if (m["tokenizer"] or "") == "local":
        try:
            tokenizer = build_local_tokenizer(texts(records) + texts(eval_records), m["tokenizer_vocab_size"])
        except ValueError as e:
            raise RecipeError(f"{d['dataset']}: {e}") from None
    else:
        key = "tokenizer" if m["tokenizer"] else "name_or_path"
        tokenizer = loading(key, lambda: AutoTokenizer.from_pretrained(
            resolve_model(m["tokenizer"]) if m["tokenizer"] else name_or_path(), trust_remote_code=m["trust_remote_code"]))
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
            config = loading("name_or_path", lambda: AutoConfig.from_pretrained(name_or_path(), **cfg_values, **extra))
        dtype = _dtype(m["dtype"])
        model = cls.from_config(config, dtype=torch.float32 if dtype == "auto" else dtype,
                                trust_remote_code=m["trust_remote_code"])
    else:
        model = loading("name_or_path", lambda: cls.from_pretrained(name_or_path(), dtype=_dtype(m["dtype"]),
                                                                    trust_remote_code=m["trust_remote_code"], **extra))
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    return Parts(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
                 tokenizer=tokenizer, compute_metrics=compute_metrics)
