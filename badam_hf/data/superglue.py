"""SuperGLUE tasks for encoder models: record formatting, tokenisation and metrics.

Records use the fields of the official SuperGLUE jsonl files (and of the Hugging Face `super_glue`
dataset, which keeps the same names):

| task | fields | model head |
| --- | --- | --- |
| boolq | question, passage, label | sequence classification (2 labels) |
| rte | premise, hypothesis, label (`entailment`/`not_entailment` or 0/1) | sequence classification |
| wic | word, sentence1, sentence2, start1, end1, start2, end2, label | sequence classification |
| wsc | text, target{span1_text, span1_index, span2_text, span2_index} (or those four flat), label | sequence classification |
| multirc | paragraph, question, answer, idx{paragraph, question, answer}, label | sequence classification |
| copa | premise, choice1, choice2, question (`cause`/`effect`), label | multiple choice (2 choices) |

MultiRC is read in the flat form (one record per answer option, as in the HF dataset); the official
nested form (`passage.questions[].answers[]`) is flattened by `flatten_multirc` first.
WiC marks the target word in both sentences with `*`; WSC marks the noun phrase with `*` and the
pronoun with `#`. Labels: BoolQ/WiC/WSC/MultiRC 1 = true; RTE 0 = entailment (HF's numbering).

Metrics: accuracy for every task; MultiRC also F1a (binary F1 over all answer options) and EM
(fraction of questions whose answer options are all classified correctly).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

TASKS = ("boolq", "copa", "multirc", "rte", "wic", "wsc")
MULTIPLE_CHOICE = ("copa",)
RTE_LABELS = {"entailment": 0, "not_entailment": 1}


class SuperGlueFormatError(ValueError):
    """A record lacks a field or has a value the task cannot use."""


def _get(record: dict, name: str, index: int, task: str, types=None):
    if not isinstance(record, dict):
        raise SuperGlueFormatError(f"{task} record {index} is a {type(record).__name__}, not a dict.")
    if name not in record or record[name] is None:
        raise SuperGlueFormatError(f"{task} record {index} has no {name!r} field.")
    value = record[name]
    if types is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in _tuple(types)):
        names = "/".join(t.__name__ for t in _tuple(types))
        raise SuperGlueFormatError(
            f"{task} record {index}: field {name!r} must be {names}, got {type(value).__name__} {value!r}."
        )
    return value


def _tuple(types):
    return types if isinstance(types, tuple) else (types,)


def _label(record: dict, index: int, task: str) -> int:
    raw = _get(record, "label", index, task)
    if task == "rte" and isinstance(raw, str):
        if raw not in RTE_LABELS:
            raise SuperGlueFormatError(
                f"rte record {index}: label {raw!r} is not one of {', '.join(map(repr, RTE_LABELS))}."
            )
        return RTE_LABELS[raw]
    if isinstance(raw, bool):
        return int(raw)
    if isinstance(raw, int) and raw in (0, 1):
        return raw
    if isinstance(raw, int) and raw == -1:
        raise SuperGlueFormatError(f"{task} record {index} has label -1 (an unlabelled test record); train on labelled data.")
    raise SuperGlueFormatError(f"{task} record {index}: label {raw!r} is not valid; expected 0/1 or true/false.")


def _mark(text: str, start: int, end: int, marker: str, index: int, task: str, field: str) -> str:
    if not (0 <= start < end <= len(text)):
        raise SuperGlueFormatError(
            f"{task} record {index}: span {field}=({start}, {end}) lies outside the sentence of length {len(text)}."
        )
    return f"{text[:start]}{marker}{text[start:end]}{marker}{text[end:]}"


def _wsc_spans(record: dict, index: int) -> tuple[str, int, str, int]:
    target = record.get("target")
    source = target if isinstance(target, dict) else record
    try:
        return tuple(  # type: ignore[return-value]
            _get(source, k, index, "wsc", t)
            for k, t in (("span1_text", str), ("span1_index", int), ("span2_text", str), ("span2_index", int))
        )
    except SuperGlueFormatError as e:
        if source is not record:
            raise SuperGlueFormatError(str(e).replace(" field", " field in 'target'")) from None
        raise


def _mark_words(words: list[str], start: int, length: int, marker: str, index: int, field: str) -> None:
    if not (0 <= start and start + length <= len(words)):
        raise SuperGlueFormatError(
            f"wsc record {index}: {field}={start} (span of {length} words) lies outside the text of {len(words)} words."
        )
    words[start] = marker + words[start]
    words[start + length - 1] = words[start + length - 1] + marker


def format_record(task: str, record: dict, index: int = 0) -> tuple[Any, int]:
    """(inputs, label) for one record.

    inputs is `(text, text_pair)` for the classification tasks and a list of `(text, text_pair)`, one
    per choice, for COPA. A missing or malformed field raises `SuperGlueFormatError` naming the field
    and the record's index.
    """
    if task not in TASKS:
        raise SuperGlueFormatError(f"unknown SuperGLUE task {task!r}; choose one of {', '.join(TASKS)}.")
    if task == "boolq":
        inputs = (_get(record, "question", index, task, str), _get(record, "passage", index, task, str))
    elif task == "rte":
        inputs = (_get(record, "premise", index, task, str), _get(record, "hypothesis", index, task, str))
    elif task == "wic":
        word = _get(record, "word", index, task, str)
        marked = []
        for n in (1, 2):
            sentence = _get(record, f"sentence{n}", index, task, str)
            start = _get(record, f"start{n}", index, task, int)
            end = _get(record, f"end{n}", index, task, int)
            marked.append(_mark(sentence, start, end, "*", index, task, f"start{n}/end{n}"))
        inputs = (f"{word}: {marked[0]}", marked[1])
    elif task == "wsc":
        text = _get(record, "text", index, task, str)
        span1_text, span1_index, span2_text, span2_index = _wsc_spans(record, index)
        words = text.split()
        _mark_words(words, span1_index, len(span1_text.split()) or 1, "*", index, "span1_index")
        _mark_words(words, span2_index, len(span2_text.split()) or 1, "#", index, "span2_index")
        inputs = (" ".join(words), f"Does #{span2_text}# refer to *{span1_text}*?")
    elif task == "multirc":
        paragraph = _get(record, "paragraph", index, task, str)
        question = _get(record, "question", index, task, str)
        answer = _get(record, "answer", index, task, str)
        inputs = (paragraph, f"{question} {answer}")
    else:  # copa
        premise = _get(record, "premise", index, task, str)
        question = _get(record, "question", index, task, str)
        if question not in ("cause", "effect"):
            raise SuperGlueFormatError(f"copa record {index}: question {question!r} must be 'cause' or 'effect'.")
        connective = "What was the cause?" if question == "cause" else "What happened as a result?"
        inputs = [(f"{premise} {connective}", _get(record, f"choice{n}", index, task, str)) for n in (1, 2)]
    return inputs, _label(record, index, task)


def multirc_group(record: dict, index: int = 0) -> tuple[int, int]:
    """(paragraph, question) ids of a flat MultiRC record: the unit of the EM metric."""
    idx = _get(record, "idx", index, "multirc", dict)
    try:
        return int(_get(idx, "paragraph", index, "multirc")), int(_get(idx, "question", index, "multirc"))
    except SuperGlueFormatError as e:
        raise SuperGlueFormatError(str(e).replace(" field", " field in 'idx'")) from None


def flatten_multirc(records: Sequence[dict]) -> list[dict]:
    """Official nested MultiRC records (`passage.questions[].answers[]`) -> flat ones; flat ones pass through."""
    out: list[dict] = []
    for i, rec in enumerate(records):
        if isinstance(rec, dict) and "passage" in rec and "paragraph" not in rec:
            passage = _get(rec, "passage", i, "multirc", dict)
            text = _get(passage, "text", i, "multirc", str)
            p_idx = rec.get("idx", i)
            for q_pos, q in enumerate(_get(passage, "questions", i, "multirc", list)):
                q_idx = q.get("idx", q_pos)
                for a_pos, a in enumerate(_get(q, "answers", i, "multirc", list)):
                    out.append({
                        "paragraph": text,
                        "question": _get(q, "question", i, "multirc", str),
                        "answer": _get(a, "text", i, "multirc", str),
                        "idx": {"paragraph": p_idx, "question": q_idx, "answer": a.get("idx", a_pos)},
                        "label": a.get("label"),
                    })
        else:
            out.append(rec)
    return out


def prepare(task: str, records: Sequence[dict]) -> list[dict]:
    """Records in the flat form `format_record` reads (only MultiRC needs flattening)."""
    return flatten_multirc(records) if task == "multirc" else list(records)


def tokenize(task: str, records: Sequence[dict], tokenizer, max_length: int = 256) -> list[dict]:
    """One feature dict per record: input_ids, attention_mask, labels (ids are [choices, len] for COPA)."""
    features = []
    for index, record in enumerate(records):
        inputs, label = format_record(task, record, index)
        if task in MULTIPLE_CHOICE:
            enc = tokenizer([a for a, _ in inputs], [b for _, b in inputs], truncation=True, max_length=max_length)
        else:
            enc = tokenizer(inputs[0], inputs[1], truncation=True, max_length=max_length)
        features.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": label})
    return features


class SuperGlueCollator:
    """Pads a batch on the right to its longest sequence; for COPA also across the choices."""

    def __init__(self, pad_token_id: int, multiple_choice: bool = False):
        self.pad_token_id = pad_token_id
        self.multiple_choice = multiple_choice

    def __call__(self, batch):
        import torch

        batch = list(batch)
        if self.multiple_choice:
            width = max(len(s) for ex in batch for s in ex["input_ids"])
            ids = [[s + [self.pad_token_id] * (width - len(s)) for s in ex["input_ids"]] for ex in batch]
            mask = [[m + [0] * (width - len(m)) for m in ex["attention_mask"]] for ex in batch]
        else:
            width = max(len(ex["input_ids"]) for ex in batch)
            ids = [ex["input_ids"] + [self.pad_token_id] * (width - len(ex["input_ids"])) for ex in batch]
            mask = [ex["attention_mask"] + [0] * (width - len(ex["attention_mask"])) for ex in batch]
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "labels": torch.tensor([ex["labels"] for ex in batch], dtype=torch.long),
        }


# --- metrics ---


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} must be non-empty and of the same shape.")
    return float((p == y).mean())


def f1a(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Binary F1 of the positive class over all answer options (MultiRC's F1a). 0 when nothing is positive."""
    p, y = np.asarray(predictions) == 1, np.asarray(labels) == 1
    tp = int((p & y).sum())
    if tp == 0:
        return 0.0
    precision, recall = tp / int(p.sum()), tp / int(y.sum())
    return 2 * precision * recall / (precision + recall)


def exact_match(predictions: Sequence[int], labels: Sequence[int], groups: Sequence) -> float:
    """Fraction of groups (MultiRC questions) whose every answer option is classified correctly."""
    if not (len(predictions) == len(labels) == len(groups)) or not groups:
        raise ValueError("predictions, labels and groups must be non-empty and of the same length.")
    ok: dict = {}
    for pred, label, group in zip(predictions, labels, groups):
        key = tuple(group) if isinstance(group, (list, tuple)) else group
        ok[key] = ok.get(key, True) and int(pred) == int(label)
    return sum(ok.values()) / len(ok)


def metrics(task: str, predictions: Sequence[int], labels: Sequence[int], groups: Sequence | None = None) -> dict:
    """The task's metrics: `accuracy`, plus `f1a` and `em` for MultiRC (which needs `groups`)."""
    out = {"accuracy": accuracy(predictions, labels)}
    if task == "multirc":
        if groups is None:
            raise ValueError("MultiRC's EM needs the (paragraph, question) group of every prediction.")
        out["f1a"] = f1a(predictions, labels)
        out["em"] = exact_match(predictions, labels, groups)
    return out


def compute_metrics_fn(task: str, groups: Sequence | None = None):
    """A `compute_metrics` for the Trainer: argmax of the logits, then `metrics`. `groups` follows the
    evaluation set's order (the Trainer evaluates in order)."""

    def compute(eval_pred) -> dict:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(logits, tuple):
            logits = logits[0]
        preds = np.asarray(logits).argmax(axis=-1)
        return metrics(task, preds.tolist(), np.asarray(labels).tolist(), groups)

    return compute
