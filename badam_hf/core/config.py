"""BAdam settings: one dataclass per concern, each validated when it is built.

`PartitionConfig` says how the model is cut into blocks, `ScheduleConfig` says in which order and for
how long each block trains, `RatioConfig` and `LisaConfig` hold the settings of the two other modes
(`mode=ratio`: a fraction of every matrix; `mode=lisa`: a few sampled layers), `InactiveUpdateConfig` the
BREAD-style update of the frozen layers, and `BAdamConfig` bundles them with the choice of inner optimizer.
`BAdamConfig.from_optim_args` reads the `--optim_args "key=value,..."` string of `TrainingArguments`.

How to add a key (the field is the only place that names it):
  1. Add one field to the section it belongs to (or to `BAdamConfig` itself), with a real type
     (`bool`, `int`, `float`, `int | None`, `list[str] | None`, `Literal[...]`) and peft-style
     `field(default=..., metadata={"help": "..."})`: the flat key, string parsing, type check and docs follow.
  2. Range checks and rules between keys go in that class's `__post_init__`: name the value and the choices.
  3. Regenerate the tables: `python -m badam_hf.tools.settings_doc --write docs/settings.md README.md`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .errors import BAdamConfigError

Granularity = Literal["layer", "attn_mlp", "matrix"]
SwitchMode = Literal["random", "ascending", "descending", "fixed"]
Mode = Literal["layer", "ratio", "lisa"]
MaskMode = Literal["adjacent", "scatter"]
InactiveUpdate = Literal["none", "sgd", "signsgd"]
InactiveScope = Literal["above", "all"]
InactiveTiming = Literal["step", "backward"]
Rounding = Literal["nearest", "stochastic"]
SwitchRounding = Literal["auto", "nearest", "stochastic"]
GRANULARITIES = typing.get_args(Granularity)
VLM_FIELDS = ("include_vision", "include_projector")  # PartitionConfig's vision-language switches
SWITCH_MODES = typing.get_args(SwitchMode)
MODES = typing.get_args(Mode)
MASK_MODES = typing.get_args(MaskMode)
INACTIVE_UPDATES = typing.get_args(InactiveUpdate)
INACTIVE_SCOPES = typing.get_args(InactiveScope)
INACTIVE_TIMINGS = typing.get_args(InactiveTiming)
ROUNDINGS = typing.get_args(Rounding)
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
# Words a string may use for a bool (--optim_args, YAML strings).
TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")


def help_text(f: dataclasses.Field) -> str:
    """A field's help (its `metadata["help"]`, peft's convention) on one line; "" when it has none."""
    return " ".join(f.metadata.get("help", "").split())


# --- types read from the annotations --------------------------------------------------------------------


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each field of `cls` (the module uses postponed annotations)."""
    return typing.get_type_hints(cls)


def _union_args(hint) -> tuple | None:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else None


def _is_list_type(hint) -> bool:
    return hint in (list, tuple) or typing.get_origin(hint) in (list, tuple)


def _fits(value: Any, hint) -> bool:
    """Whether a Python value has the type `hint` allows (a bool is not an integer here; an int is a number)."""
    if hint is Any:
        return True
    args = _union_args(hint)
    if args is not None:
        return any(_fits(value, a) for a in args)
    origin = typing.get_origin(hint)
    if origin is Literal:
        return any(value == c and type(value) is type(c) for c in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if _is_list_type(hint):
        return isinstance(value, (list, tuple))
    if hint is type or origin is type:
        return isinstance(value, type)  # which classes are fine is the field's own check
    return isinstance(value, hint) if isinstance(hint, type) else True


def describe_type(hint) -> str:
    """`hint` in words, for messages and docs: "an integer or none", "one of 'a', 'b'"."""
    args = _union_args(hint)
    if args is not None:
        return " or ".join(dict.fromkeys(describe_type(a) for a in args))
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    if _is_list_type(hint):
        return f"a list (items joined with {LIST_SEPARATOR} in optim_args)"
    if hint is type or origin is type:
        inner = typing.get_args(hint)
        return f"a subclass of {inner[0].__name__}" if inner else "a class"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "none"}
    if hint in words:
        return words[hint]
    if dataclasses.is_dataclass(hint):
        return f"a {hint.__name__} or a dict of its fields"
    return f"a {getattr(hint, '__name__', hint)}"


def check_types(obj: Any) -> None:
    """Refuse any field of the dataclass `obj` whose value its annotation does not allow; turn the ints of
    float fields into floats and the sequences of list fields into lists (the instance's own fields only)."""
    for f in dataclasses.fields(obj):
        hint = field_types(type(obj))[f.name]
        value = getattr(obj, f.name)
        if _is_list_type(hint) or any(_is_list_type(a) for a in _union_args(hint) or ()):
            value = _as_list(value)
            setattr(obj, f.name, value)
        if not _fits(value, hint):
            if typing.get_origin(hint) is Literal:
                raise BAdamConfigError(
                    f"{f.name}={value!r} is not valid; choose one of {', '.join(map(repr, typing.get_args(hint)))}."
                )
            raise BAdamConfigError(f"{f.name}={value!r} is not valid; {f.name} must be {describe_type(hint)}.")
        if hint is float:
            setattr(obj, f.name, float(value))


def _as_list(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


# --- strings (optim_args, YAML) to typed values ---------------------------------------------------------


def parse_value(key: str, raw: Any, hint, source: str) -> Any:
    """Turn a string from the command line into the type `hint` names, with an error that names the key.
    Values that are not strings are returned as they are (the dataclass checks them)."""
    if not isinstance(raw, str):
        return raw
    try:
        return _from_string(raw, hint)
    except ValueError:
        expected = "true/false (or yes/no, 1/0)" if hint is bool else describe_type(hint)
        raise BAdamConfigError(f"{key}={raw!r} in {source} is not valid; expected {expected}.") from None


def _from_string(raw: str, hint) -> Any:
    args = _union_args(hint)
    if args is not None:
        if any(_is_list_type(a) for a in args):  # "none" in a list field means the empty list
            return _from_string(raw, next(a for a in args if _is_list_type(a)))
        if type(None) in args and raw.lower() == "none":
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _from_string(raw, a)
            except ValueError:
                pass
        raise ValueError(raw)
    if _is_list_type(hint):
        if raw.lower() in ("none", "[]", ""):
            return []
        (item,) = typing.get_args(hint)[:1] or (str,)
        return [_from_string(v, item) for v in raw.split(LIST_SEPARATOR) if v]
    if hint is bool:
        low = raw.lower()
        if low in TRUE_WORDS:
            return True
        if low in FALSE_WORDS:
            return False
        raise ValueError(raw)
    if hint is int:
        return int(raw)
    if hint is float:
        return float(raw)
    if hint is str or hint is Any or typing.get_origin(hint) is Literal:
        return raw  # a Literal's choices are checked by the dataclass, with the list of choices
    raise ValueError(raw)  # a class or other object cannot be written as a string


def _with_args_doc(cls):
    """Append an `Args:` section built from the fields' help to the class docstring (help() shows it)."""
    lines = [f"        {f.name}: {help_text(f)}" for f in dataclasses.fields(cls) if help_text(f)]
    if lines:
        cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n    Args:\n" + "\n".join(lines) + "\n"
    return cls


# --- the sections -----------------------------------------------------------------------------------------


@_with_args_doc
@dataclass
class PartitionConfig:
    """How the parameters are split into blocks."""

    granularity: Granularity = field(default="layer", metadata={
        "summary": "blocks: `layer`, `attn_mlp` (two per layer) or `matrix` (one per weight matrix)",
        "help": (
            "`layer` (one block per repeated layer, the paper's default), `attn_mlp` (attention and the rest of each "
            "layer as two blocks) or `matrix` (one block per weight matrix with its bias, plus one per layer for its "
            "leftover 1-D parameters such as norms)."
        ),
    })
    target_modules: list[str] | None = field(default=None, metadata={"help": (
        "explicit blocks instead of `granularity`: each entry is a parameter-name prefix (`model.layers.0`) or a "
        "regular expression matched against whole parameter names, and defines one block. Same meaning as "
        "`TrainingArguments.optim_target_modules`."
    )})
    include_embedding: bool = field(default=False, metadata={
        "summary": "train the input embeddings as one extra block",
        "help": (
            "add the input side (token/position embeddings, whatever runs before the layer stack) as one extra block."
        ),
    })
    include_lm_head: bool = field(default=False, metadata={
        "summary": "train the final norm and LM head as one extra block",
        "help": (
            "add the output side (final norm, LM head) as one extra block."
        ),
    })
    always_active: list[str] | None = field(default=None, metadata={"help": (
        "module-name prefixes trained in every block, e.g. `classifier+pooler`. Unset picks a randomly "
        "initialised task head (`classifier`, `score`, `qa_outputs`) when the model has one; `none` means none."
    )})
    # --- vision-language models (Llava, Qwen2-VL / 2.5-VL / 3-VL, Gemma 3). By default their blocks are the
    # language model's layers and the vision tower and projector stay frozen (LlamaFactory's defaults).
    include_vision: bool = field(default=False, metadata={"help": (
        "vision-language models: add the vision tower's layers as blocks, after the language layers in the "
        "block order (layers whose output the model never reads, e.g. Llava's last CLIP layer with "
        "vision_feature_layer=-2, are left out).")})
    include_projector: bool = field(default=False, metadata={"help": (
        "vision-language models: train the projector / merger between the vision tower and the language "
        "model in every block (always active).")})

    def __post_init__(self):
        check_types(self)
        if self.target_modules is not None and not self.target_modules:
            raise BAdamConfigError("target_modules is empty; leave it unset to partition by `granularity`.")
        if self.target_modules is not None and (self.include_embedding or self.include_lm_head):
            raise BAdamConfigError(
                "include_embedding/include_lm_head do not combine with target_modules: with explicit blocks, "
                "name the embedding or head as a block of its own in target_modules."
            )
        if self.target_modules is not None and self.include_vision:
            raise BAdamConfigError(
                "include_vision does not combine with target_modules: with explicit blocks, name the vision "
                "layers in target_modules."
            )


@_with_args_doc
@dataclass
class ScheduleConfig:
    """Which block trains when."""

    switch_every: int | None = field(default=None, metadata={
        "summary": "K, optimizer steps per block; unset: 100 (`mode=lisa`: 20)",
        "help": (
            "K, the number of optimizer steps (after gradient accumulation) each block gets before the next one is "
            "activated (with `mode=ratio`: before the masks move; with `mode=lisa`: before new layers are sampled). "
            "Unset: 100 (the paper's value for instruction tuning), 20 with `mode=lisa` (LISA's interval)."
        ),
    })
    switch_mode: SwitchMode = field(default="random", metadata={
        "summary": "block order: `random`, `ascending`, `descending` or `fixed`",
        "help": (
            "`random` (a new random order each block-epoch), `ascending`, `descending` or `fixed` (only `start_block`"
            " ever trains). `mode=layer` only."
        ),
    })
    start_block: int | None = field(default=None, metadata={"help": (
        "index of the first block. Unset: 0, or the last block for `descending`, or a random one for `random`. "
        "`mode=layer` only."
    )})
    seed: int = field(default=42, metadata={"help": (
        "seed of the private generator behind the `random` order, ratio's masks and LISA's draws, so they are "
        "reproducible and independent of the global torch RNG."
    )})

    def __post_init__(self):
        check_types(self)
        if self.switch_every is not None and self.switch_every < 1:
            raise BAdamConfigError(
                f"switch_every={self.switch_every!r} is not valid; it is the number of optimizer steps per block "
                "and must be an integer >= 1 (the paper uses 100)."
            )
        if self.start_block is not None and self.start_block < 0:
            raise BAdamConfigError(f"start_block={self.start_block!r} is not valid; it must be an integer >= 0.")


@_with_args_doc
@dataclass
class RatioConfig:
    """`mode=ratio`: every parameter in the partition trains a fraction of its entries at a time."""

    update_ratio: float = field(default=0.05, metadata={
        "summary": "`mode=ratio`: fraction of each matrix trained at a time, in (0, 1]",
        "help": (
            "`mode=ratio`: the fraction of each parameter's entries updated in a period, in (0, 1] (LlamaFactory's "
            "`badam_update_ratio`). Each parameter gets max(1, floor(update_ratio x its size)) entries; they move "
            "every `switch_every` optimizer steps."
        ),
    })
    mask_mode: MaskMode = field(default="adjacent", metadata={"help": (
        "`mode=ratio`: `adjacent` (one run of consecutive entries of the flattened tensor; over 1/update_ratio "
        "periods the runs sweep the whole tensor, from a random phase per parameter) or `scatter` (one entry "
        "drawn uniformly from each of as many equal runs)."
    )})

    def __post_init__(self):
        check_types(self)
        if not 0.0 < self.update_ratio <= 1.0:
            raise BAdamConfigError(
                f"update_ratio={self.update_ratio!r} is not valid; it is the fraction of each matrix's entries "
                "trained at a time and must lie in (0, 1] (LlamaFactory's default is 0.05)."
            )


@_with_args_doc
@dataclass
class LisaConfig:
    """`mode=lisa`: `lisa_layers` blocks (layers) sampled without replacement every `switch_every` steps, with
    everything outside the layer stack (embeddings, final norm, LM head) trained throughout unless
    `always_active` says otherwise."""

    lisa_layers: int = field(default=2, metadata={
        "summary": "`mode=lisa`: layers sampled at a time",
        "help": (
            "`mode=lisa`: gamma, the number of layers trained at a time, 1..the number of layers (LMFlow's "
            "`lisa_activated_layers`)."
        ),
    })

    def __post_init__(self):
        check_types(self)
        if self.lisa_layers < 1:
            raise BAdamConfigError(
                f"lisa_layers={self.lisa_layers!r} is not valid; it is the number of layers sampled at a time and "
                "must be an integer >= 1 (LISA's default is 2)."
            )


@_with_args_doc
@dataclass
class InactiveUpdateConfig:
    """BREAD-style updates of the layers that are not active (the BAdam authors' follow-up): once per optimizer
    step, each such parameter takes one plain step `p -= lr x inactive_lr_scale x g` (`sgd`) or
    `... x sign(g)` (`signsgd`) in its own dtype, and its gradient is freed; no state is kept. By default
    (`inactive_timing=step`) the step comes after the optimizer step's inf/NaN check; `backward` takes it
    inside the backward instead, to save the memory of the waiting gradients."""

    inactive_update: InactiveUpdate = field(default="none", metadata={
        "summary": "`sgd` or `signsgd`: cheap updates of the layers that are not active (BREAD)",
        "help": (
            "`none` (BAdam), `sgd` or `signsgd`: the layers that are not active take `p -= lr x inactive_lr_scale x "
            "g` (or `sign(g)`) at each optimizer step. Modes `layer` and `lisa`."
        ),
    })
    inactive_lr_scale: float = field(default=5.0, metadata={"help": (
        "the inactive step's learning rate as a multiple of the scheduled one (BREAD's default)."
    )})
    inactive_scope: InactiveScope = field(default="above", metadata={"help": (
        "`above` (only the layers above the lowest active one and the output side, whose backward runs anyway, so"
        " BAdam's backward truncation is kept) or `all` (every other parameter: a full backward)."
    )})
    inactive_rounding: Rounding = field(default="nearest", metadata={"help": (
        "how BREAD's inactive step lands in a bf16 weight: `nearest` (the step in bf16 arithmetic, as BREAD does;"
        " an update below half an ulp is lost) or `stochastic` (the step in fp32, rounded up or down at random with"
        " the probabilities that keep its expected value)."
    )})
    inactive_timing: InactiveTiming = field(default="step", metadata={"help": (
        "when the inactive step is taken. `step`: in the optimizer step, after its inf/NaN check (which covers"
        " these gradients; a skipped step leaves every weight bit-identical), and clipped with the active block's"
        " gradient; the inactive gradients wait on the parameters until then (2 bytes per parameter in bf16)."
        " `backward`: inside the last micro-batch's backward, as each inactive gradient completes, which is then"
        " freed (no memory beyond the backward's), and before gradient clipping (which does not see them). Each"
        " gradient is checked first: a non-finite one and every inactive update after it in that backward are"
        " dropped and the optimizer step is skipped, but the inactive tensors updated earlier in the same backward"
        " keep their update (no NaN/inf reaches a weight; with skip_nonfinite=false nothing is checked)."
    )})

    def __post_init__(self):
        check_types(self)
        if not 0.0 < self.inactive_lr_scale < float("inf"):
            raise BAdamConfigError(
                f"inactive_lr_scale={self.inactive_lr_scale!r} is not valid; it multiplies the learning rate of the "
                "inactive layers' update and must be a finite number > 0 (BREAD's default is 5.0)."
            )

    @property
    def enabled(self) -> bool:
        return self.inactive_update != "none"


@_with_args_doc
@dataclass
class BAdamConfig:
    """All BAdam settings. The sections (`partition`, `schedule`, `ratio`, `lisa`, `inactive`) accept a
    config object or a dict of its fields; the flat view (`from_flat`, `from_optim_args`) spreads their
    fields and this class's own into one namespace of keys."""

    mode: Mode = field(default="layer", metadata={
        "summary": "`layer` (one block at a time), `ratio` (part of every matrix) or `lisa` (a few sampled layers)",
        "help": (
            "`layer` (BAdam: one block at a time), `ratio` (every parameter of the partition trains a fraction of its"
            " entries, see `RatioConfig`) or `lisa` (a few sampled layers plus the embeddings and head, see "
            "`LisaConfig`)."
        ),
    })
    partition: PartitionConfig = field(default_factory=PartitionConfig, metadata={"help": "see `PartitionConfig`."})
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata={"help": "see `ScheduleConfig`."})
    ratio: RatioConfig = field(default_factory=RatioConfig, metadata={"help": "see `RatioConfig`."})
    lisa: LisaConfig = field(default_factory=LisaConfig, metadata={"help": "see `LisaConfig`."})
    inactive: InactiveUpdateConfig = field(default_factory=InactiveUpdateConfig, metadata={"help": (
        "see `InactiveUpdateConfig`."
    )})
    inner_optimizer: str | type[torch.optim.Optimizer] = field(default="adamw", metadata={"help": (
        "the optimizer run on the active block: `adamw`, `adam`, `sgd`, or a dotted path to any "
        "`torch.optim.Optimizer` subclass (`torch.optim.Adagrad`)."
    )})
    truncate_backward: bool = field(default=True, metadata={"help": (
        "stop the backward pass at the lowest active layer (BAdam's backward saving)."
    )})
    fp32_grad_accumulation: bool = field(default=True, metadata={"help": (
        "for bf16 weights, move each active parameter's gradient into its fp32 master gradient as soon as "
        "autograd produces it and free the bf16 one: accumulation over micro-batches happens in fp32 and no bf16 "
        "gradient of the block stays alive. `false` keeps the bf16 gradient on the weight until the step (as the "
        "authors' package and LlamaFactory do). Engines that own the gradients (FSDP2 shards, DeepSpeed ZeRO-3) "
        "keep their own path whatever this says."
    )})
    split_masters: bool = field(default=True, metadata={"help": (
        "between two steps, keep each fp32 master of a bf16 weight as the 16 low bits the weight lacks (2 bytes "
        "instead of 4 per active element; rebuilt bit for bit before the next step). The weight is then the "
        "master rounded to nearest with ties toward zero (torch breaks ties to even: they differ about once in "
        "65536 roundings, both half an ulp away). `false` keeps the fp32 masters whole."
    )})
    switch_rounding: SwitchRounding = field(default="auto", metadata={"help": (
        "how a block's fp32 masters are rounded into the bf16 weights the last time, when they are dropped (block "
        "switch, LISA layers leaving the sample, a ratio period ending, the last step of training): `stochastic` "
        "(up or down at random with the probabilities that keep the expected value, so updates below half a bf16 "
        "ulp survive on average), `nearest` (the authors' package's behaviour), or `auto`: stochastic wherever "
        "badam_hf writes the masters (one process, DDP, FSDP2), nearest under DeepSpeed ZeRO-3, which writes them "
        "itself. Between the steps of a visit the masters stay exact either way."
    )})
    chunked_loss: bool = field(default=True, metadata={"help": (
        "compute a causal LM's training loss in chunks of `loss_chunk_tokens` labelled tokens, so the batch's "
        "full fp32 logits never exist (head and cross-entropy recomputed per chunk in backward). Models it cannot "
        "serve keep their own loss (see `integrations.chunked_loss`); evaluation always gets full logits. `false` "
        "trains with the model's own loss."
    )})
    # = chunked_loss.DEFAULT_LOSS_CHUNK_TOKENS (config stays free of integrations)
    loss_chunk_tokens: int = field(default=256, metadata={"help": (
        "tokens per chunk of the chunked loss (its temporaries are about 8 bytes x chunk x vocabulary), >= 1."
    )})
    skip_nonfinite: bool = field(default=True, metadata={"help": (
        "skip an optimizer step whose active-block gradient holds inf/NaN (one fused check before the inner step): "
        "weights, masters and moments stay as they were, and the step still counts towards switch_every. "
        "`false`: step regardless."
    )})
    max_skipped_steps: int = field(default=10, metadata={"help": (
        "with skip_nonfinite, stop training (NonFiniteGradientError) after this many skipped steps in a row, >= 1."
    )})

    def __post_init__(self):
        for name, cls in self.sections().items():  # a dict becomes its section; a caller's object is kept
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        check_types(self)
        if self.loss_chunk_tokens < 1:
            raise BAdamConfigError(
                f"loss_chunk_tokens={self.loss_chunk_tokens!r} is not valid; it must be a whole number of tokens >= 1 "
                "(default 256)."
            )
        if self.max_skipped_steps < 1:
            raise BAdamConfigError(
                f"max_skipped_steps={self.max_skipped_steps!r} is not valid; it is the number of non-finite steps in "
                "a row that stops training and must be an integer >= 1 (default 10)."
            )
        if self.schedule.switch_every is None:
            # A copy: the ScheduleConfig the caller passed may serve another config with another mode.
            self.schedule = dataclasses.replace(self.schedule, switch_every=DEFAULT_SWITCH_EVERY[self.mode])
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
                "inactive_lr_scale/inactive_scope/inactive_timing/inactive_rounding configure inactive_update, which "
                "is 'none'; set inactive_update=sgd or signsgd, or leave them unset."
            )
        if self.inactive.enabled and mode == "ratio":
            raise BAdamConfigError(
                f"inactive_update={self.inactive.inactive_update!r} updates the layers that are not active, and "
                "mode='ratio' has none (every matrix trains a part of its entries); use it with mode=layer or lisa."
            )

    @property
    def stochastic_switch(self) -> bool:
        """Whether badam_hf's own write of a block's last masters rounds stochastically (`auto` included)."""
        return self.switch_rounding != "nearest"

    @property
    def inner_optimizer_cls(self) -> type[torch.optim.Optimizer]:
        return resolve_optimizer_class(self.inner_optimizer)

    # --- the flat key=value view used by --optim_args and recipes ---

    @classmethod
    def sections(cls) -> dict[str, type]:
        """The fields that are sections (a settings dataclass of their own): name -> class."""
        hints = field_types(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}

    @classmethod
    def flat_settings(cls) -> list[tuple[str, str | None, dataclasses.Field, Any]]:
        """Every flat key in field order, as (key, section, field, type); section None means a field of
        BAdamConfig itself. A list, so that a key defined twice shows (`flat_fields` refuses that)."""
        out = []
        hints, sections = field_types(cls), cls.sections()
        for f in dataclasses.fields(cls):
            if f.name in sections:
                sub = sections[f.name]
                out += [(g.name, f.name, g, field_types(sub)[g.name]) for g in dataclasses.fields(sub)]
            else:
                out.append((f.name, None, f, hints[f.name]))
        return out

    @classmethod
    def flat_fields(cls) -> dict[str, tuple[str | None, Any]]:
        """Every flat key, mapped to (section, type). Section None means a field of BAdamConfig itself."""
        out: dict[str, tuple[str | None, Any]] = {}
        for key, section, _, hint in cls.flat_settings():
            if key in out:
                raise TypeError(
                    f"flat key {key!r} is defined in {out[key][0] or 'BAdamConfig'} and in {section or 'BAdamConfig'}."
                )
            out[key] = (section, hint)
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
        sections: dict[str | None, dict[str, Any]] = {name: {} for name in cls.sections()} | {None: {}}
        for key, raw in values.items():
            section, hint = known[key]
            sections[section][key] = parse_value(key, raw, hint, source)
        top = sections.pop(None)
        return cls(**sections, **top)  # each section's dict becomes its dataclass in __post_init__

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
