"""`--optim badam`: teach transformers a new optimizer name when `badam_hf` is imported.

Five small, idempotent registrations:
1. `OptimizerNames.BADAM = "badam"`, so `TrainingArguments(optim="badam")`, the argparse choices that
   `HfArgumentParser` builds from the enum, `parse_dict`/`parse_yaml_file` and TRL configs accept it.
2. A handler in transformers' optimizer registry, so a plain `Trainer` builds a `BlockOptimizer`.
3. A check at the end of `TrainingArguments.__post_init__`, so bad `--optim_args` fail when the
   arguments are parsed, before any model or data is loaded.
4. After `Trainer.create_optimizer` returns a BlockOptimizer, the `BAdamCallback` is attached.
5. Under FSDP2, the Trainer's and accelerate's optimizer checkpoint functions save and load a BlockOptimizer
   as one file per rank (see `badam_hf.fsdp.register_checkpoint_io`).
"""

from __future__ import annotations

import functools

from transformers import Trainer, TrainingArguments
from transformers import trainer_optimizer
from transformers.training_args import OptimizerNames

from .config import BAdamConfig

OPTIM_NAME = "badam"
MEMBER_NAME = "BADAM"


def _add_enum_member(enum_cls, name: str, value: str):
    """Add a member to an existing str-valued Enum (stdlib enum has no public API for this)."""
    if value in enum_cls._value2member_map_:
        return enum_cls._value2member_map_[value]
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    if hasattr(enum_cls, "_sort_order_") or any(hasattr(m, "_sort_order_") for m in enum_cls):
        member._sort_order_ = len(enum_cls._member_names_)
    # type.__setattr__: EnumType.__setattr__ refuses to (re)bind member names.
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)  # list on 3.11-3.13; iteration and argparse choices read it
    return member


class BlockOptimizerFactory:
    """What the handler returns: transformers instantiates it, then calls it with (model, **kwargs)."""

    def __call__(self, model, args):
        from .trainer import block_optimizer_from_args

        return block_optimizer_from_args(model, args)


def _badam_handler(ctx):
    # The Trainer passes its TrainingArguments here; lr, betas, eps, weight decay and optim_args come from them.
    return BlockOptimizerFactory, {"args": ctx.args}


def _validate_training_args(args) -> None:
    if getattr(args, "optim", None) == OPTIM_NAME:  # OptimizerNames is a str enum: the member equals "badam"
        BAdamConfig.from_optim_args(args.optim_args, args.optim_target_modules)
        check_engine_args(args)


def check_engine_args(args) -> None:
    """A DeepSpeed config BAdam cannot train with (e.g. its own "optimizer" block, which would silently
    replace BAdam) fails with the arguments, before any model is loaded."""
    if getattr(args, "deepspeed", None):
        from .deepspeed_zero3 import check_training_args

        check_training_args(args)


def _wrap_post_init(cls) -> None:
    original = cls.__post_init__
    if getattr(original, "_badam_wrapped", False):
        return

    @functools.wraps(original)
    def __post_init__(self, *a, **kw):
        original(self, *a, **kw)
        _validate_training_args(self)

    __post_init__._badam_wrapped = True
    cls.__post_init__ = __post_init__


def _wrap_create_optimizer(cls) -> None:
    original = cls.create_optimizer
    if getattr(original, "_badam_wrapped", False):
        return

    @functools.wraps(original)
    def create_optimizer(self, *a, **kw):
        from .trainer import ensure_badam_callback, unwrap_optimizer

        opt = original(self, *a, **kw)
        if unwrap_optimizer(opt) is not None:
            ensure_badam_callback(self)
        return opt

    create_optimizer._badam_wrapped = True
    cls.create_optimizer = create_optimizer


def register() -> None:
    member = _add_enum_member(OptimizerNames, MEMBER_NAME, OPTIM_NAME)
    trainer_optimizer._OPTIMIZER_HANDLERS[member] = _badam_handler
    _wrap_post_init(TrainingArguments)
    _wrap_create_optimizer(Trainer)
    from .fsdp import register_checkpoint_io

    register_checkpoint_io()
