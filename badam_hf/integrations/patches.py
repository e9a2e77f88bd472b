"""Every change badam_hf makes to transformers and accelerate objects, in one place. Each is idempotent and
inert unless a BlockOptimizer is involved. Checked against transformers 5.24 and accelerate 1.15 (the
versions the test suite runs; pyproject allows transformers >=5,<6).

1. `OptimizerNames.BADAM = "badam"`, so `TrainingArguments(optim="badam")`, the argparse choices that
   `HfArgumentParser` builds from the enum, `parse_dict`/`parse_yaml_file` and TRL configs accept it.
2. A handler in transformers' optimizer registry (`trainer_optimizer._OPTIMIZER_HANDLERS`), so a plain
   `Trainer` builds a `BlockOptimizer`.
3. A check at the end of `TrainingArguments.__post_init__`, so bad `--optim_args` (and a DeepSpeed config
   BAdam cannot train with) fail when the arguments are parsed, before any model or data is loaded.
4. After `Trainer.create_optimizer` returns a BlockOptimizer, the `BAdamCallback` is attached and the trainer's
   compute_loss computes a causal LM's loss in chunks (`chunked_loss`, see `integrations.chunked_loss`).
5. Under FSDP2, `save_fsdp_optimizer` / `load_fsdp_optimizer` (in `transformers.trainer` and
   `accelerate.accelerator`) save and load a BlockOptimizer as one file per rank: accelerate's own path goes
   through torch.distributed.checkpoint and would take a fake optimizer step (a block switch) on an
   optimizer without state.
6. `transformers.trainer.deepspeed_load_checkpoint`: the Trainer loads a DeepSpeed checkpoint right after
   `deepspeed.initialize`, before any callback runs, so BAdam's ZeRO-3 glue is attached first and the load
   sees the saved block's layout.
7. `Accelerator.clip_grad_norm_` (the Trainer clips `model.parameters()` through it): with fp32 gradient
   accumulation the active block's gradients live on its fp32 masters, so those are clipped (and their
   norm logged) in place of the parameters, whose `.grad` is None.
8. `Accelerator.prepare`: under `--torch_compile` (accelerate's dynamo plugin), when the objects prepared
   include a BlockOptimizer, its model's stack layers are compiled one by one (`core.compilation`) instead
   of the whole model, which would recompile at every block switch and fall back to eager after a few.
"""

from __future__ import annotations

import functools
import importlib

from transformers import Trainer, TrainingArguments
from transformers import trainer_optimizer
from transformers.training_args import OptimizerNames

from ..core.compilation import compile_layers
from ..core.config import BAdamConfig
from ..core.optimizer import unwrap_optimizer
from ..engines.deepspeed import attach_deepspeed
from ..engines.dispatch import check_training_args
from ..engines.fsdp2 import load_sharded_optimizer, save_sharded_optimizer
from .trainer import block_optimizer_from_args, ensure_badam_callback, install_chunked_loss

OPTIM_NAME = "badam"
MEMBER_NAME = "BADAM"


def _replace(owner, name: str, wrap) -> None:
    """`owner.name = wrap(original)`, once: a second call (or a missing original) changes nothing. The
    wrapper keeps the original's name and docs and is marked so that it is recognised."""
    original = getattr(owner, name, None)
    if original is None or getattr(original, "_badam_wrapped", False):
        return
    wrapper = functools.wraps(original)(wrap(original))
    wrapper._badam_wrapped = True
    setattr(owner, name, wrapper)


# --- 1-4: --optim badam ------------------------------------------------------------------------------

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
        return block_optimizer_from_args(model, args)


def _badam_handler(ctx):
    # The Trainer passes its TrainingArguments here; lr, betas, eps, weight decay and optim_args come from them.
    return BlockOptimizerFactory, {"args": ctx.args}


def _validate_training_args(args) -> None:
    if getattr(args, "optim", None) == OPTIM_NAME:  # OptimizerNames is a str enum: the member equals "badam"
        BAdamConfig.from_optim_args(args.optim_args, args.optim_target_modules)
        check_training_args(args)


def _wrap_post_init(cls) -> None:
    def wrap(original):
        def __post_init__(self, *a, **kw):
            original(self, *a, **kw)
            _validate_training_args(self)

        return __post_init__

    _replace(cls, "__post_init__", wrap)


def _wrap_create_optimizer(cls) -> None:
    def wrap(original):
        def create_optimizer(self, *a, **kw):
            opt = original(self, *a, **kw)
            if unwrap_optimizer(opt) is not None:
                ensure_badam_callback(self)
                install_chunked_loss(self)
            return opt

        return create_optimizer

    _replace(cls, "create_optimizer", wrap)


# --- 5: FSDP2 optimizer checkpoints ---------------------------------------------------------------------


def _wrap_fsdp_optimizer_io(module) -> None:
    """Route accelerate's FSDP optimizer save/load (which goes through torch.distributed.checkpoint and would
    take a fake optimizer step, i.e. a block switch, on an optimizer without state) to the per-rank files
    above when the optimizer is a BlockOptimizer; everything else is left to accelerate."""
    save, load = getattr(module, "save_fsdp_optimizer", None), getattr(module, "load_fsdp_optimizer", None)
    if save is None or load is None or getattr(save, "_badam_wrapped", False):
        return

    def save_fsdp_optimizer(fsdp_plugin, accelerator, optimizer, model, output_dir, *args, **kwargs):
        opt = unwrap_optimizer(optimizer)
        if opt is None:
            return save(fsdp_plugin, accelerator, optimizer, model, output_dir, *args, **kwargs)
        save_sharded_optimizer(opt, output_dir)

    def load_fsdp_optimizer(fsdp_plugin, accelerator, optimizer, model, input_dir, *args, **kwargs):
        opt = unwrap_optimizer(optimizer)
        if opt is None:
            return load(fsdp_plugin, accelerator, optimizer, model, input_dir, *args, **kwargs)
        load_sharded_optimizer(opt, input_dir)

    save_fsdp_optimizer._badam_wrapped = load_fsdp_optimizer._badam_wrapped = True
    module.save_fsdp_optimizer, module.load_fsdp_optimizer = save_fsdp_optimizer, load_fsdp_optimizer


def _route_fsdp_optimizer_io() -> None:
    """Install the save/load routing where the Trainer and accelerate call it (idempotent)."""
    for name in ("transformers.trainer", "accelerate.accelerator"):
        try:
            _wrap_fsdp_optimizer_io(importlib.import_module(name))
        except ImportError:  # pragma: no cover
            pass


# --- 6: DeepSpeed resume -------------------------------------------------------------------------------


def _attach_before_deepspeed_load() -> None:
    """The Trainer loads a DeepSpeed checkpoint right after `deepspeed.initialize`, before any callback runs;
    attach BAdam's glue first (when the engine trains a BlockOptimizer) so the load sees the saved layout."""
    try:
        import transformers.trainer as hf_trainer
    except ImportError:  # pragma: no cover
        return

    def wrap(original):
        def deepspeed_load_checkpoint(deepspeed_engine, checkpoint_path, *args, **kwargs):
            opt = unwrap_optimizer(getattr(deepspeed_engine, "optimizer", None))
            if opt is not None:
                attach_deepspeed(deepspeed_engine, opt)
            return original(deepspeed_engine, checkpoint_path, *args, **kwargs)

        return deepspeed_load_checkpoint

    _replace(hf_trainer, "deepspeed_load_checkpoint", wrap)


# --- 7: gradient clipping sees the fp32 gradients ----------------------------------------------------------


def _clip_the_masters() -> None:
    try:
        from accelerate import Accelerator
    except ImportError:  # pragma: no cover
        return

    def wrap(original):
        def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
            for accelerated in getattr(self, "_optimizers", ()):
                opt = unwrap_optimizer(accelerated)
                if opt is not None:
                    parameters = opt.gradient_holders(parameters)
                    break
            return original(self, parameters, max_norm, norm_type)

        return clip_grad_norm_

    _replace(Accelerator, "clip_grad_norm_", wrap)


# --- 8: --torch_compile compiles layer by layer -----------------------------------------------------------


def _compile_layers_on_prepare() -> None:
    try:
        from accelerate import Accelerator
        from accelerate.utils import DynamoBackend
    except ImportError:  # pragma: no cover
        return

    def wrap(original):
        def prepare(self, *args, **kwargs):
            plugin = getattr(self.state, "dynamo_plugin", None)
            opts = [unwrap_optimizer(a) for a in args if hasattr(a, "step") and hasattr(a, "param_groups")]
            opt = next((o for o in opts if o is not None), None)
            if opt is None or plugin is None or plugin.backend == DynamoBackend.NO:
                return original(self, *args, **kwargs)
            compile_layers(opt.model, opt.partition, **plugin.to_kwargs())
            backend, plugin.backend = plugin.backend, DynamoBackend.NO  # accelerate must not compile the whole model
            try:
                return original(self, *args, **kwargs)
            finally:
                plugin.backend = backend

        return prepare

    _replace(Accelerator, "prepare", wrap)


def install() -> None:
    member = _add_enum_member(OptimizerNames, MEMBER_NAME, OPTIM_NAME)
    trainer_optimizer._OPTIMIZER_HANDLERS[member] = _badam_handler
    _wrap_post_init(TrainingArguments)
    _wrap_create_optimizer(Trainer)
    _route_fsdp_optimizer_io()
    _attach_before_deepspeed_load()
    _clip_the_masters()
    _compile_layers_on_prepare()
