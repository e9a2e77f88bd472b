"""BAdam settings: one dataclass per concern, each validated when it is built.

`PartitionConfig` says how the model is cut into blocks, `ScheduleConfig` says in which order and for
how long each block trains, and `BAdamConfig` bundles both with the choice of inner optimizer.
`BAdamConfig.from_optim_args` reads the `--optim_args "key=value,..."` string of `TrainingArguments`.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import BAdamConfigError

GRANULARITIES = ("layer", "attn_mlp", "matrix")
SWITCH_MODES = ("random", "ascending", "descending", "fixed")
# Short names for the inner optimizer; anything else must be a dotted path to a torch.optim.Optimizer class.
INNER_OPTIMIZERS = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}
# Separator for list values inside --optim_args (HF splits that string on "," and "=", so lists need another).
LIST_SEPARATOR = "+"


def _choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise BAdamConfigError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}.")


def _as_list(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


@dataclass
class PartitionConfig:
    """How the parameters are split into blocks.

    Args:
        granularity: `layer` (one block per repeated layer, the paper's default), `attn_mlp` (attention and
            the rest of each layer as two blocks) or `matrix` (one block per weight matrix with its bias).
        target_modules: explicit blocks instead of a granularity; each entry is a parameter-name prefix
            (`model.layers.0`) or a regular expression matched against whole parameter names, and
            defines one block. Same meaning as `TrainingArguments.optim_target_modules`.
        include_embedding: add the input embeddings (and whatever else runs before the layer stack) as
            one extra block.
        include_lm_head: add the output side (final norm, LM head) as one extra block.
        always_active: module-name prefixes trained in every block. `None` picks a randomly initialised
            task head (`classifier`, `score`, `qa_outputs`) when the model has one; `[]` means none.
    """

    granularity: str = "layer"
    target_modules: list[str] | None = None
    include_embedding: bool = False
    include_lm_head: bool = False
    always_active: list[str] | None = None

    def __post_init__(self):
        _choice("granularity", self.granularity, GRANULARITIES)
        self.target_modules = _as_list(self.target_modules)
        self.always_active = _as_list(self.always_active)
        if self.target_modules is not None and not self.target_modules:
            raise BAdamConfigError("target_modules is empty; leave it unset to partition by `granularity`.")
        for name in ("include_embedding", "include_lm_head"):
            if not isinstance(getattr(self, name), bool):
                raise BAdamConfigError(f"{name} must be true or false, got {getattr(self, name)!r}.")
        if self.target_modules is not None and (self.include_embedding or self.include_lm_head):
            raise BAdamConfigError(
                "include_embedding/include_lm_head do not combine with target_modules: with explicit blocks, "
                "name the embedding or head as a block of its own in target_modules."
            )


@dataclass
class ScheduleConfig:
    """Which block trains when.

    Args:
        switch_every: K, the number of optimizer steps (after gradient accumulation) each block gets
            before the next one is activated. The paper uses 100 for instruction tuning.
        switch_mode: `random` (a new random order each block-epoch), `ascending`, `descending` or
            `fixed` (only `start_block` ever trains).
        start_block: index of the first block. Default: 0, or the last block for `descending`, or a
            random one for `random`.
        seed: seed of the private generator behind the `random` order, so the order is reproducible and
            independent of the global torch RNG.
    """

    switch_every: int = 100
    switch_mode: str = "random"
    start_block: int | None = None
    seed: int = 42

    def __post_init__(self):
        _choice("switch_mode", self.switch_mode, SWITCH_MODES)
        if isinstance(self.switch_every, bool) or not isinstance(self.switch_every, int) or self.switch_every < 1:
            raise BAdamConfigError(
                f"switch_every={self.switch_every!r} is not valid; it is the number of optimizer steps per block "
                "and must be an integer >= 1 (the paper uses 100)."
            )
        if self.start_block is not None and (
            isinstance(self.start_block, bool) or not isinstance(self.start_block, int) or self.start_block < 0
        ):
            raise BAdamConfigError(f"start_block={self.start_block!r} is not valid; it must be an integer >= 0.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise BAdamConfigError(f"seed={self.seed!r} is not valid; it must be an integer.")


@dataclass
class BAdamConfig:
    """All BAdam settings.

    Args:
        partition: see `PartitionConfig`.
        schedule: see `ScheduleConfig`.
        inner_optimizer: the optimizer run on the active block: `adamw` (default), `adam`, `sgd`, or a
            dotted path to any `torch.optim.Optimizer` subclass (`torch.optim.Adagrad`).
        truncate_backward: stop the backward pass at the lowest active layer (BAdam's backward saving).
        fp32_grad_accumulation: for low-precision (bf16) weights, move each active parameter's gradient into
            its fp32 master gradient as soon as autograd produces it and free the bf16 one: gradient
            accumulation over micro-batches then happens in fp32, and no bf16 gradient of the block stays
            alive. `false` keeps the bf16 gradient on the parameter until the step (the authors' package
            and LlamaFactory do that). Engines that own the gradients (FSDP2 shards, DeepSpeed ZeRO-3)
            keep their own path whatever this says.
        split_masters: between two steps, keep each fp32 master of a bf16 weight as the 16 low bits that the
            weight lacks (2 bytes instead of 4 per active element; rebuilt bit for bit before the next step).
            The weight is then the master rounded to nearest with ties toward zero (torch breaks ties to
            even: they differ when the dropped half is exactly 0x8000, about once in 65536 roundings, and
            are both half an ulp away). `false` keeps the fp32 masters whole.
    """

    partition: PartitionConfig = field(default_factory=PartitionConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    inner_optimizer: str | type = "adamw"
    truncate_backward: bool = True
    fp32_grad_accumulation: bool = True
    split_masters: bool = True

    def __post_init__(self):
        for name in ("truncate_backward", "fp32_grad_accumulation", "split_masters"):
            if not isinstance(getattr(self, name), bool):
                raise BAdamConfigError(f"{name}={getattr(self, name)!r} is not valid; it must be true or false.")
        if isinstance(self.partition, dict):
            self.partition = PartitionConfig(**self.partition)
        if isinstance(self.schedule, dict):
            self.schedule = ScheduleConfig(**self.schedule)
        self.inner_optimizer_cls  # validate now, not at the first step

    @property
    def inner_optimizer_cls(self) -> type[torch.optim.Optimizer]:
        return resolve_optimizer_class(self.inner_optimizer)

    # --- the flat key=value view used by --optim_args and recipes ---

    @classmethod
    def flat_fields(cls) -> dict[str, tuple[str | None, type]]:
        """Every flat key, mapped to (section, type). Section None means a field of BAdamConfig itself."""
        out: dict[str, tuple[str | None, type]] = {}
        for section, sub in (("partition", PartitionConfig), ("schedule", ScheduleConfig)):
            for f in dataclasses.fields(sub):
                out[f.name] = (section, f.type)
        out["inner_optimizer"] = (None, str)
        out["truncate_backward"] = (None, bool)
        out["fp32_grad_accumulation"] = (None, bool)
        out["split_masters"] = (None, bool)
        return out

    @classmethod
    def from_flat(cls, values: dict[str, Any], source: str = "BAdam settings") -> "BAdamConfig":
        """Build from a flat dict (`switch_every=100, granularity=layer, ...`); strings are converted."""
        known = cls.flat_fields()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise BAdamConfigError(
                f"unknown key(s) {', '.join(map(repr, unknown))} in {source}; valid keys are: "
                f"{', '.join(sorted(known))}."
            )
        sections: dict[str | None, dict[str, Any]] = {"partition": {}, "schedule": {}, None: {}}
        for key, raw in values.items():
            section, typ = known[key]
            sections[section][key] = _convert(key, raw, typ, source)
        return cls(
            partition=PartitionConfig(**sections["partition"]),
            schedule=ScheduleConfig(**sections["schedule"]),
            **sections[None],
        )

    @classmethod
    def from_optim_args(cls, optim_args: str | None, target_modules=None) -> "BAdamConfig":
        """Parse `TrainingArguments.optim_args` ("switch_every=50,switch_mode=ascending")."""
        values: dict[str, str] = {}
        for item in (optim_args or "").replace(" ", "").split(","):
            if not item:
                continue
            if item.count("=") != 1:
                raise BAdamConfigError(
                    f"cannot read {item!r} in optim_args {optim_args!r}: write key=value pairs separated by commas, "
                    f"and list values with {LIST_SEPARATOR!r} (always_active=classifier{LIST_SEPARATOR}pooler)."
                )
            key, value = item.split("=")
            if key in values:
                raise BAdamConfigError(f"key {key!r} appears twice in optim_args {optim_args!r}.")
            values[key] = value
        if target_modules is not None:
            if "target_modules" in values:
                raise BAdamConfigError(
                    "target_modules is given twice: in optim_args and in optim_target_modules; keep one."
                )
            # Already a list, or HF's plain string: split that on commas, not on LIST_SEPARATOR ("+" is
            # common in regexes such as `layers\.\d+`).
            values["target_modules"] = _as_list(target_modules)
        return cls.from_flat(values, source="optim_args")


def _convert(key: str, raw: Any, typ, source: str) -> Any:
    """Turn a string from the command line into the field's type, with an error that names the key."""
    typ_s = str(typ)
    if not isinstance(raw, str):
        return raw  # already typed (a dict from YAML, a Python caller); the dataclass validates it
    try:
        if typ_s in ("bool", "<class 'bool'>"):
            low = raw.lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError
        if "list" in typ_s:
            if raw.lower() in ("none", "[]", ""):
                return []
            return [v for v in raw.split(LIST_SEPARATOR) if v]
        if "int" in typ_s:
            if raw.lower() == "none" and "None" in typ_s:
                return None
            return int(raw)
        return raw
    except ValueError:
        expected = "true/false" if "bool" in typ_s else "an integer" if "int" in typ_s else typ_s
        raise BAdamConfigError(f"{key}={raw!r} in {source} is not valid; expected {expected}.") from None


def resolve_optimizer_class(spec: str | type) -> type[torch.optim.Optimizer]:
    """`adamw` / `torch.optim.Adagrad` / a class -> the optimizer class, or a clear error."""
    if isinstance(spec, type):
        cls = spec
    elif spec in INNER_OPTIMIZERS:
        cls = INNER_OPTIMIZERS[spec]
    elif isinstance(spec, str) and "." in spec:
        module_name, _, attr = spec.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            raise BAdamConfigError(f"inner_optimizer={spec!r} cannot be imported.") from None
    else:
        raise BAdamConfigError(
            f"inner_optimizer={spec!r} is not valid; choose one of {', '.join(map(repr, INNER_OPTIMIZERS))} "
            "or give a dotted path such as 'torch.optim.Adagrad'."
        )
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise BAdamConfigError(f"inner_optimizer={spec!r} is not a torch.optim.Optimizer subclass.")
    return cls
