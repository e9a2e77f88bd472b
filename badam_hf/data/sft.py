"""Instruction-tuning data in the Alpaca layout (`instruction`, `input`, `output`), ready for a causal LM.

Each record becomes one sequence: a prompt built from the instruction (and the input, when there is
one) followed by the response and an end-of-sequence token. Only the response and the EOS are
trained on: prompt positions carry the label -100, which the loss ignores.

Everything here works offline: `build_local_tokenizer` trains a small byte-level BPE tokenizer on the
given texts, so demos and tests need no download.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

IGNORE_INDEX = -100
REQUIRED_FIELDS = ("instruction", "output")  # `input` may be missing or empty
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>", "<bos>")

PROMPT_WITH_INPUT = (
    "Below is a task, paired with some context. Write a reply that carries out the task.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is a task. Write a reply that carries out the task.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def _check_record(record: Any, index: int) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"record {index} is a {type(record).__name__}, not a dict with Alpaca fields.")
    for name in REQUIRED_FIELDS:
        if name not in record or record[name] is None:
            raise ValueError(f"record {index} has no {name!r} field (Alpaca records need 'instruction' and 'output').")
        if not isinstance(record[name], str):
            raise ValueError(f"record {index}: field {name!r} must be a string, got {type(record[name]).__name__}.")
    if record.get("input") is not None and not isinstance(record["input"], str):
        raise ValueError(f"record {index}: field 'input' must be a string, got {type(record['input']).__name__}.")


def format_alpaca(record: dict, index: int = 0) -> tuple[str, str]:
    """(prompt, response) for one Alpaca record; the Input section is left out when `input` is empty."""
    _check_record(record, index)
    instruction = record["instruction"].strip()
    context = (record.get("input") or "").strip()
    if context:
        prompt = PROMPT_WITH_INPUT.format(instruction=instruction, input=context)
    else:
        prompt = PROMPT_NO_INPUT.format(instruction=instruction)
    return prompt, record["output"]


TEMPLATES = ("alpaca", "chat")


def format_chat(record: dict, tokenizer, index: int = 0) -> tuple[str, str]:
    """(prompt, response) with the tokenizer's own chat template: the instruction (and input) as one user
    turn, the prompt ending where the assistant's answer starts."""
    _check_record(record, index)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "template 'chat' needs a tokenizer with a chat template (tokenizer.chat_template is empty); "
            "use template 'alpaca' or an instruct model's tokenizer."
        )
    context = (record.get("input") or "").strip()
    content = record["instruction"].strip() + (f"\n\n{context}" if context else "")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return prompt, record["output"]


def tokenize_sft(
    records: Sequence[dict], tokenizer, cutoff_len: int = 512, add_bos: bool = False, template: str = "alpaca"
) -> dict[str, list[list[int]]]:
    """Token ids, attention masks and labels for supervised fine-tuning.

    The sequence is `[bos] prompt response eos`, cut to `cutoff_len` tokens (the end is dropped).
    Labels are -100 on the prompt (and BOS) and equal the ids on the response and EOS. `template` is
    `alpaca` (the Alpaca prompt) or `chat` (the tokenizer's chat template, which brings its own BOS).
    """
    if template not in TEMPLATES:
        raise ValueError(f"template {template!r} is not valid; choose one of {', '.join(TEMPLATES)}.")
    if cutoff_len < 1:
        raise ValueError(f"cutoff_len must be >= 1, got {cutoff_len}.")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one (tokenizer.eos_token = ...).")
    if add_bos and tokenizer.bos_token_id is None:
        raise ValueError("add_bos=True but the tokenizer has no bos_token.")
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for index, record in enumerate(records):
        if template == "chat":
            prompt, response = format_chat(record, tokenizer, index)
        else:
            prompt, response = format_alpaca(record, index)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
        if add_bos:
            prompt_ids = [tokenizer.bos_token_id] + prompt_ids
        ids = (prompt_ids + response_ids)[:cutoff_len]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:cutoff_len]
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
    return out


def load_alpaca_json(path: str | Path) -> list[dict]:
    """Records from a JSON list (`[{...}, ...]`) or a JSON Lines file (one object per line)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        raise ValueError(f"{path} is empty.")
    if stripped.startswith("["):
        records = json.loads(text)
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno} is not valid JSON: {e.msg}.") from None
    if isinstance(records, dict):
        records = [records]
    for index, record in enumerate(records):
        _check_record(record, index)
    return records


def train_val_split(records: Sequence[Any], val_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """(train, val): a seeded shuffle, then the first `val_fraction` of it held out. Same seed, same split."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(records) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(records) > 1:
        n_val = 1
    val = [records[i] for i in order[:n_val]]
    train = [records[i] for i in order[n_val:]]
    return train, val


class SFTDataset(torch.utils.data.Dataset):
    """The output of `tokenize_sft` as a map-style dataset of dicts."""

    def __init__(self, features: dict[str, list[list[int]]]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features["input_ids"])

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {k: v[i] for k, v in self.features.items()}


class SFTCollator:
    """Pads a batch to its longest sequence (on the right): ids with `pad_token_id`, labels with -100."""

    def __init__(self, pad_token_id: int, label_pad_id: int = IGNORE_INDEX):
        self.pad_token_id = pad_token_id
        self.label_pad_id = label_pad_id

    def __call__(self, batch: Iterable[dict]) -> dict[str, torch.Tensor]:
        batch = list(batch)
        width = max(len(ex["input_ids"]) for ex in batch)
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": self.label_pad_id}
        out = {}
        for key, pad in pads.items():
            if key not in batch[0]:
                continue
            rows = [list(ex[key]) + [pad] * (width - len(ex[key])) for ex in batch]
            out[key] = torch.tensor(rows, dtype=torch.long)
        return out


def build_local_tokenizer(texts: Iterable[str], vocab_size: int = 1000):
    """A byte-level BPE tokenizer trained on `texts`, as a `PreTrainedTokenizerFast`.

    Offline and deterministic: the same texts give the same vocabulary. Byte-level, so any text
    round-trips through encode/decode. Special tokens: <pad> (0), <eos> (1), <unk> (2), <bos> (3).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<bos>"
    )


def alpaca_texts(records: Iterable[dict]) -> list[str]:
    """Every prompt and response of `records`, for training a tokenizer on them."""
    texts = []
    for index, record in enumerate(records):
        prompt, response = format_alpaca(record, index)
        texts.extend((prompt, response))
    return texts
