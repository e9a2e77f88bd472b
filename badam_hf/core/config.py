"""BAdam settings: one dataclass per concern, each validated when it is built.

`PartitionConfig` says how the model is cut into blocks, `ScheduleConfig` says in which order and for
how long each block trains, `RatioConfig` and `LisaConfig` hold the settings of the two other modes
(`mode=ratio`: a fraction of every matrix; `mode=lisa`: a few sampled layers), `InactiveUpdateConfig` the
BREAD-style update of the frozen layers, and `BAdamConfig` bundles them with the choice of inner optimizer.
`BAdamConfig.from_optim_args` reads the `--optim_args "key=value,..."` string of `TrainingArguments`.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .errors import BAdamConfigError

GRANULARITIES = ("layer", "attn_mlp", "matrix")
SWITCH_MODES = ("random", "ascending", "descending", "fixed")
MODES = ("layer", "ratio", "lisa")
MASK_MODES = ("adjacent", "scatter")
INACTIVE_UPDATES = ("none", "sgd", "signsgd")
INACTIVE_SCOPES = ("above", "all")
ROUNDINGS = ("nearest", "stochastic")
# switch_every when it is not given: the paper's K for blocks and ratio masks, LISA's sampling interval.
DEFAULT_SWITCH_EVERY = {"layer": 100, "ratio": 100, "lisa": 20}
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
            before the next one is activated (with `mode=ratio`: before the masks move; with `mode=lisa`:
            before new layers are sampled). Default 100 (the paper's value for instruction tuning), 20 for
            `mode=lisa` (LISA's interval).
        switch_mode: `random` (a new random order each block-epoch), `ascending`, `descending` or
            `fixed` (only `start_block` ever trains).
        start_block: index of the first block. Default: 0, or the last block for `descending`, or a
            random one for `random`.
        seed: seed of the private generator behind the `random` order, so the order is reproducible and
            independent of the global torch RNG.
    """

    switch_every: int | None = None
    switch_mode: str = "random"
    start_block: int | None = None
    seed: int = 42

    def __post_init__(self):
        _choice("switch_mode", self.switch_mode, SWITCH_MODES)
        if self.switch_every is not None and (
            isinstance(self.switch_every, bool) or not isinstance(self.switch_every, int) or self.switch_every < 1
        ):
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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class RatioConfig:
    """`mode=ratio`: every parameter in the partition trains a fraction of its entries at a time.

    Args:
        update_ratio: the fraction of each parameter's entries updated in a period, in (0, 1]
            (LlamaFactory's `badam_update_ratio`, default 0.05). Each parameter gets
            max(1, floor(update_ratio x its size)) entries; they move every `switch_every` optimizer steps.
        mask_mode: `adjacent` (one run of consecutive entries of the flattened tensor; over 1/update_ratio
            periods the runs sweep the whole tensor, from a random phase per parameter) or `scatter`
            (entries spread over the whole tensor: one drawn uniformly from each of as many equal runs).
    """

    update_ratio: float = 0.05
    mask_mode: str = "adjacent"

    def __post_init__(self):
        _choice("mask_mode", self.mask_mode, MASK_MODES)
        if not _is_number(self.update_ratio) or not 0.0 < float(self.update_ratio) <= 1.0:
            raise BAdamConfigError(
                f"update_ratio={self.update_ratio!r} is not valid; it is the fraction of each matrix's entries "
                "trained at a time and must lie in (0, 1] (LlamaFactory's default is 0.05)."
            )
        self.update_ratio = float(self.update_ratio)


@dataclass
class LisaConfig:
    """`mode=lisa`: `lisa_layers` blocks (layers) sampled without replacement every `switch_every` steps, with
    everything outside the layer stack (embeddings, final norm, LM head) trained throughout unless
    `always_active` says otherwise.

    Args:
        lisa_layers: gamma, the number of layers trained at a time (LMFlow's `lisa_activated_layers`, default 2).
    """

    lisa_layers: int = 2

    def __post_init__(self):
        if isinstance(self.lisa_layers, bool) or not isinstance(self.lisa_layers, int) or self.lisa_layers < 1:
            raise BAdamConfigError(
                f"lisa_layers={self.lisa_layers!r} is not valid; it is the number of layers sampled at a time and "
                "must be an integer >= 1 (LISA's default is 2)."
            )


@dataclass
class InactiveUpdateConfig:
    """BREAD-style updates of the layers that are not active (the BAdam authors' follow-up): during the same
    backward, each such parameter takes one plain step `p -= lr x inactive_lr_scale x g` (`sgd`) or
    `... x sign(g)` (`signsgd`) in its own dtype, and its gradient is freed at once; no state is kept.

    Args:
        inactive_update: `none` (default: BAdam), `sgd` or `signsgd`.
        inactive_lr_scale: the inactive step's learning rate as a multiple of the scheduled one (default 5.0).
        inactive_scope: `above` (default: only the layers above the lowest active one and the output side,
            whose backward runs anyway, so BAdam's backward truncation is kept) or `all` (every other
            parameter: a full backward).
        inactive_rounding: how the step lands in a bf16 weight: `nearest` (default: the step in bf16
            arithmetic, as BREAD does; an update below half an ulp is lost) or `stochastic` (the step in fp32,
            rounded up or down at random with the probabilities that keep its expected value).
    """

    inactive_update: str = "none"
    inactive_lr_scale: float = 5.0
    inactive_scope: str = "above"
    inactive_rounding: Literal["nearest", "stochastic"] = field(default="nearest", metadata={"help": (
        "how BREAD's in-backward step lands in a bf16 weight: nearest (bf16 arithmetic; updates below half an "
        "ulp are lost) or stochastic (fp32 step, rounded up or down at random, unbiased).")})

    def __post_init__(self):
        _choice("inactive_update", self.inactive_update, INACTIVE_UPDATES)
        _choice("inactive_scope", self.inactive_scope, INACTIVE_SCOPES)
        _choice("inactive_rounding", self.inactive_rounding, ROUNDINGS)
        if not _is_number(self.inactive_lr_scale) or not 0.0 < float(self.inactive_lr_scale) < float("inf"):
            raise BAdamConfigError(
                f"inactive_lr_scale={self.inactive_lr_scale!r} is not valid; it multiplies the learning rate of the "
                "inactive layers' update and must be a finite number > 0 (BREAD's default is 5.0)."
            )
        self.inactive_lr_scale = float(self.inactive_lr_scale)

    @property
    def enabled(self) -> bool:
        return self.inactive_update != "none"


@dataclass
class BAdamConfig:
    """All BAdam settings.

    Args:
        mode: `layer` (BAdam: one block at a time, the default), `ratio` (every parameter of the partition
            trains a fraction of its entries, see `RatioConfig`) or `lisa` (a few sampled layers plus the
            embeddings and head, see `LisaConfig`).
        partition: see `PartitionConfig`.
        schedule: see `ScheduleConfig`.
        ratio, lisa, inactive: see `RatioConfig`, `LisaConfig`, `InactiveUpdateConfig`.
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
        switch_rounding: how a block's fp32 masters are rounded into the bf16 weights the last time, when
            they are dropped (block switch, LISA layers leaving the sample, a ratio period ending, the last
            step of training): `nearest`, or `stochastic` (up or down at random with the probabilities that
            keep the expected value, so updates below half a bf16 ulp survive on average). Between the steps
            of a visit the masters stay exact either way.
    """

    mode: str = "layer"
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ratio: RatioConfig = field(default_factory=RatioConfig)
    lisa: LisaConfig = field(default_factory=LisaConfig)
    inactive: InactiveUpdateConfig = field(default_factory=InactiveUpdateConfig)
    inner_optimizer: str | type = "adamw"
    truncate_backward: bool = True
    fp32_grad_accumulation: bool = True
    split_masters: bool = True
    switch_rounding: Literal["nearest", "stochastic"] = field(default="nearest", metadata={"help": (
        "how a block's fp32 masters are rounded into bf16 weights when they are dropped (block switch, end of "
        "a LISA/ratio period, last step of training): nearest or stochastic (unbiased).")})

    def __post_init__(self):
        for name in ("truncate_backward", "fp32_grad_accumulation", "split_masters"):
            if not isinstance(getattr(self, name), bool):
                raise BAdamConfigError(f"{name}={getattr(self, name)!r} is not valid; it must be true or false.")
        if isinstance(self.partition, dict):
            self.partition = PartitionConfig(**self.partition)
        if isinstance(self.schedule, dict):
            self.schedule = ScheduleConfig(**self.schedule)
        for name, cls in self._SECTIONS[2:]:
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        _choice("mode", self.mode, MODES)
        _choice("switch_rounding", self.switch_rounding, ROUNDINGS)
        if self.schedule.switch_every is None:
            self.schedule.switch_every = DEFAULT_SWITCH_EVERY[self.mode]
        self._check_mode_combinations()
        self.inner_optimizer_cls  # validate now, not at the first step

    def _check_mode_combinations(self) -> None:
        """Settings that mean something in one mode only are refused in the others (they would be ignored)."""
        mode, sched, part = self.mode, self.schedule, self.partition
        if mode != "layer":
            if sched.switch_mode != "random":
                raise BAdamConfigError(
                    f"switch_mode={sched.switch_mode!r} orders the blocks of mode='layer'; mode={mode!r} "
                    + ("moves its masks by itself" if mode == "ratio" else "samples its layers at random")
                    + ": leave switch_mode unset."
                )
            if sched.start_block is not None:
                raise BAdamConfigError(f"start_block applies to mode='layer' only; leave it unset with mode={mode!r}.")
        if mode == "lisa" and (part.include_embedding or part.include_lm_head):
            raise BAdamConfigError(
                "include_embedding/include_lm_head make the embeddings or head a block of their own; with mode='lisa' "
                "they are trained in every step already (set always_active to choose what trains throughout)."
            )
        if mode != "ratio" and (self.ratio != RatioConfig()):
            raise BAdamConfigError(
                f"update_ratio/mask_mode apply to mode='ratio' only (this config has mode={mode!r}); set mode=ratio "
                "or leave them unset."
            )
        if mode != "lisa" and self.lisa != LisaConfig():
            raise BAdamConfigError(
                f"lisa_layers applies to mode='lisa' only (this config has mode={mode!r}); set mode=lisa or leave it "
                "unset."
            )
        if self.inactive != InactiveUpdateConfig() and not self.inactive.enabled:
            raise BAdamConfigError(
                "inactive_lr_scale/inactive_scope/inactive_rounding configure inactive_update, which is 'none'; set "
                "inactive_update=sgd or signsgd, or leave them unset."
            )
        if self.inactive.enabled and mode == "ratio":
            raise BAdamConfigError(
                f"inactive_update={self.inactive.inactive_update!r} updates the layers that are not active, and "
                "mode='ratio' has none (every matrix trains a part of its entries); use it with mode=layer or lisa."
            )

    _SECTIONS = (
        ("partition", PartitionConfig),
        ("schedule", ScheduleConfig),
        ("ratio", RatioConfig),
        ("lisa", LisaConfig),
        ("inactive", InactiveUpdateConfig),
    )

    @property
    def inner_optimizer_cls(self) -> type[torch.optim.Optimizer]:
        return resolve_optimizer_class(self.inner_optimizer)

    # --- the flat key=value view used by --optim_args and recipes ---

    @classmethod
    def flat_fields(cls) -> dict[str, tuple[str | None, type]]:
        """Every flat key, mapped to (section, type). Section None means a field of BAdamConfig itself."""
        out: dict[str, tuple[str | None, type]] = {"mode": (None, str)}
        for section, sub in cls._SECTIONS:
            for f in dataclasses.fields(sub):
                out[f.name] = (section, f.type)
        out["inner_optimizer"] = (None, str)
        out["truncate_backward"] = (None, bool)
        out["fp32_grad_accumulation"] = (None, bool)
        out["split_masters"] = (None, bool)
        out["switch_rounding"] = (None, str)
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
        sections: dict[str | None, dict[str, Any]] = {name: {} for name, _ in cls._SECTIONS} | {None: {}}
        for key, raw in values.items():
            section, typ = known[key]
            sections[section][key] = _convert(key, raw, typ, source)
        return cls(**{name: sub(**sections[name]) for name, sub in cls._SECTIONS}, **sections[None])

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
        if typ_s in ("float", "<class 'float'>"):
            return float(raw)
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
        expected = ("true/false" if "bool" in typ_s else "a number" if "float" in typ_s
                    else "an integer" if "int" in typ_s else typ_s)
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
