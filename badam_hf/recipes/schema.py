"""What a recipe may contain: the sections, the keys of `model` and `data` (`Key` tables), the types the
`training` section accepts (read from `transformers.TrainingArguments`' annotations), and the type checks.

Imports nothing else of `badam_hf.recipes`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

DTYPES = ("bfloat16", "float32", "float16", "auto")
TEMPLATES = ("alpaca", "chat")


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


# --- TrainingArguments field types ---


def _training_fields() -> dict[str, tuple | None]:
    """Every `TrainingArguments` init field -> the Python types a YAML value may have (None: anything)."""
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
