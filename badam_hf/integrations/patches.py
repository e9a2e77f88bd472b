"""Every change badam_hf makes to transformers and accelerate objects, in one place. Each is idempotent and
inert unless a BlockOptimizer is involved. Supported: the ranges of `SUPPORTED` (pyproject.toml's lower
bounds, no upper bound); `make compat` tests both ends (`TESTED_VERSIONS`). Where the supported releases differ,
`core.hf_features` detects what is there.

1. `OptimizerNames.BADAM = "badam"`, so `TrainingArguments(optim="badam")`, the argparse choices that
   `HfArgumentParser` builds from the enum, `parse_dict`/`parse_yaml_file` and TRL configs accept it. The
   member pickles as the plain string "badam", so a `training_args.bin` loads in a process that never
   imported badam_hf (its `optim` is then the string "badam").
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

Nothing is skipped silently: `install()` (run by `import badam_hf`) looks up every entry of `TARGETS`, and
a missing one raises `UnsupportedVersionError` naming it, the installed versions and the tested ones. The
targets of an optional engine (5: FSDP2, 6: DeepSpeed) are the exception: when one is missing the import
succeeds, and BAdam is refused when that engine is used (TrainingArguments naming it, or a BlockOptimizer
built under it), so a renamed accelerate function can never make FSDP2 checkpoints silently take the fake
block switch.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata

from ..core.compilation import compile_layers
from ..core.config import BAdamConfig
from ..core.errors import UnsupportedVersionError
from ..core.optimizer import BlockOptimizer, unwrap_optimizer
from ..engines.common import engine_from_environment, engine_of
from ..engines.deepspeed import attach_deepspeed
from ..engines.dispatch import check_training_args
from ..engines.fsdp2 import load_sharded_optimizer, save_sharded_optimizer
from .trainer import (block_optimizer_from_args, ensure_badam_callback, install_chunked_loss,
                      refuse_loss_scaling_with_inactive_update)

OPTIM_NAME = "badam"
MEMBER_NAME = "BADAM"
# The lower bounds of pyproject.toml (tests/test_patches.py keeps them equal), and the oldest and newest
# releases `make compat` ran the unit tests with (docs/development.md, "Supported versions").
SUPPORTED = ("transformers>=5.18", "accelerate>=1.10")
TESTED_VERSIONS = "transformers 5.18-5.25, accelerate 1.10-1.16, trl 1.10-1.16, peft 0.18-0.21"
# What the error message tells a user to install: the newest releases tested.
NEWEST_TESTED = ("transformers==5.25.*", "accelerate==1.16.*")


# --- the targets ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """One object badam_hf changes or relies on: `module:attribute.path`. `engine` is None when every run
    needs it, else the only engine that does ("FSDP2", "DeepSpeed")."""

    path: str
    engine: str | None = None

    @property
    def module(self) -> str:
        return self.path.split(":")[0]

    @property
    def attrs(self) -> list[str]:
        return self.path.split(":")[1].split(".")

    @property
    def name(self) -> str:
        return self.path.replace(":", ".")


ENUM = Target("transformers.training_args:OptimizerNames")  # 1
HANDLERS = Target("transformers.trainer_optimizer:_OPTIMIZER_HANDLERS")  # 2
POST_INIT = Target("transformers.training_args:TrainingArguments.__post_init__")  # 3
CREATE_OPTIMIZER = Target("transformers.trainer:Trainer.create_optimizer")  # 4
FSDP_IO = tuple(  # 5
    Target(f"{module}:{fn}", "FSDP2")
    for module in ("transformers.trainer", "accelerate.accelerator")
    for fn in ("save_fsdp_optimizer", "load_fsdp_optimizer")
)
DEEPSPEED_LOAD = Target("transformers.trainer:deepspeed_load_checkpoint", "DeepSpeed")  # 6
CLIP = Target("accelerate.accelerator:Accelerator.clip_grad_norm_")  # 7
PREPARE = Target("accelerate.accelerator:Accelerator.prepare")  # 8
DYNAMO_BACKEND = Target("accelerate.utils:DynamoBackend")  # read by 8
# Enum internals written by `_add_enum_member` (stdlib enum has no public API for adding a member).
ENUM_INTERNALS = ("_member_map_", "_value2member_map_", "_member_names_")

WRAPPED = (POST_INIT, CREATE_OPTIMIZER, *FSDP_IO, DEEPSPEED_LOAD, CLIP, PREPARE)
TARGETS = (ENUM, HANDLERS, *WRAPPED, DYNAMO_BACKEND)

# engine -> the messages of its missing targets (filled by `install`; the engine is refused when used).
_unavailable: dict[str, list[str]] = {}
_MISSING = object()


def _versions() -> str:
    found = []
    for dist in ("transformers", "accelerate"):
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{dist} (not installed)")
    return ", ".join(found)


def _missing(target: Target, what: str) -> UnsupportedVersionError:
    return UnsupportedVersionError(
        f"badam_hf cannot patch {target.name}: {what}. Installed: {_versions()}; badam_hf supports "
        f"{', '.join(SUPPORTED)} and is tested with {TESTED_VERSIONS}. This release changed what badam_hf "
        f"needs; until a badam_hf release supports it, install a tested version: "
        f"pip install {' '.join(repr(p) for p in NEWEST_TESTED)}"
    )


def lookup(target: Target):
    """(owner, attribute name, current value) of `target`; `UnsupportedVersionError` when it is missing."""
    try:
        value = importlib.import_module(target.module)
    except ImportError as e:
        raise _missing(target, f"module {target.module} cannot be imported ({e})") from None
    owner = value
    for i, attr in enumerate(target.attrs):
        owner, value = value, getattr(value, attr, _MISSING)
        if value is _MISSING:
            raise _missing(target, f"{target.module}.{'.'.join(target.attrs[: i + 1])} does not exist")
    return owner, target.attrs[-1], value


def _replace(target: Target, wrap) -> None:
    """`owner.name = wrap(original)`, once: a second call changes nothing. The wrapper keeps the original's
    name and docs and is marked so that it is recognised. A missing or non-callable original raises."""
    owner, name, original = lookup(target)
    if not callable(original):
        raise _missing(target, f"it is a {type(original).__name__}, not a function")
    if getattr(original, "_badam_wrapped", False):
        return
    wrapper = functools.wraps(original)(wrap(original))
    wrapper._badam_wrapped = True
    setattr(owner, name, wrapper)


def _replace_optional(target: Target, wrap) -> None:
    """`_replace` for an optional engine's target: a missing one refuses that engine, not the import."""
    try:
        _replace(target, wrap)
    except UnsupportedVersionError as e:
        _unavailable.setdefault(target.engine, []).append(str(e))


def require_engine(engine: str | None) -> None:
    """Refuse to train under `engine` when one of its patch targets was missing at install."""
    problems = _unavailable.get(engine) if engine else None
    if problems:
        raise UnsupportedVersionError(
            f"BAdam cannot train under {engine} with the installed versions: " + " ".join(problems)
        )


def _refuse_unpatched_engine(model) -> None:
    # A construction check of every BlockOptimizer (see `BlockOptimizer.register_construction_check`).
    if _unavailable:
        require_engine(engine_of(model) or engine_from_environment())


# --- 1-4: --optim badam ------------------------------------------------------------------------------


def _pickle_as_str(value: str):
    # Enum members pickle as `(OptimizerNames, ("badam",))`, which a process without badam_hf cannot load.
    return lambda protocol=2: (str, (value,))


def _add_enum_member(enum_cls, name: str, value: str):
    """Add a member to an existing str-valued Enum (stdlib enum has no public API for this). It pickles as a
    plain str (see `_pickle_as_str`)."""
    for internal in ENUM_INTERNALS:
        if not hasattr(enum_cls, internal):
            raise _missing(ENUM, f"the enum has no {internal} (Python's enum internals changed)")
    if value in enum_cls._value2member_map_:
        member = enum_cls._value2member_map_[value]
    else:
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
    # An instance attribute: pickle looks `__reduce_ex__` up on the object, copy/deepcopy keep the member.
    member.__reduce_ex__ = _pickle_as_str(value)
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
        config = BAdamConfig.from_optim_args(args.optim_args, args.optim_target_modules)
        if getattr(args, "fp16", False):
            refuse_loss_scaling_with_inactive_update(config)
        if getattr(args, "deepspeed", None):
            require_engine("DeepSpeed")
        if getattr(args, "fsdp", None):
            require_engine("FSDP2")
        check_training_args(args)


def _wrap_post_init(original):
    def __post_init__(self, *a, **kw):
        original(self, *a, **kw)
        _validate_training_args(self)

    return __post_init__


def _wrap_create_optimizer(original):
    def create_optimizer(self, *a, **kw):
        opt = original(self, *a, **kw)
        if unwrap_optimizer(opt) is not None:
            ensure_badam_callback(self)
            install_chunked_loss(self)
        return opt

    return create_optimizer


# --- 5: FSDP2 optimizer checkpoints ---------------------------------------------------------------------
# accelerate's FSDP optimizer save/load goes through torch.distributed.checkpoint and would take a fake
# optimizer step (a block switch) on an optimizer without state: a BlockOptimizer goes to the per-rank files
# of `engines.fsdp2` instead; everything else is left to accelerate.


def _wrap_fsdp_save(original):
    def save_fsdp_optimizer(fsdp_plugin, accelerator, optimizer, model, output_dir, *args, **kwargs):
        opt = unwrap_optimizer(optimizer)
        if opt is None:
            return original(fsdp_plugin, accelerator, optimizer, model, output_dir, *args, **kwargs)
        save_sharded_optimizer(opt, output_dir)

    return save_fsdp_optimizer


def _wrap_fsdp_load(original):
    def load_fsdp_optimizer(fsdp_plugin, accelerator, optimizer, model, input_dir, *args, **kwargs):
        opt = unwrap_optimizer(optimizer)
        if opt is None:
            return original(fsdp_plugin, accelerator, optimizer, model, input_dir, *args, **kwargs)
        load_sharded_optimizer(opt, input_dir)

    return load_fsdp_optimizer


# --- 6: DeepSpeed resume -------------------------------------------------------------------------------


def _wrap_deepspeed_load(original):
    """The Trainer loads a DeepSpeed checkpoint right after `deepspeed.initialize`, before any callback runs;
    attach BAdam's glue first (when the engine trains a BlockOptimizer) so the load sees the saved layout."""

    def deepspeed_load_checkpoint(deepspeed_engine, checkpoint_path, *args, **kwargs):
        opt = unwrap_optimizer(getattr(deepspeed_engine, "optimizer", None))
        if opt is not None:
            attach_deepspeed(deepspeed_engine, opt)
        return original(deepspeed_engine, checkpoint_path, *args, **kwargs)

    return deepspeed_load_checkpoint


# --- 7: gradient clipping sees the fp32 gradients ----------------------------------------------------------


def _wrap_clip(original):
    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        for accelerated in getattr(self, "_optimizers", ()):
            opt = unwrap_optimizer(accelerated)
            if opt is not None:
                parameters = opt.gradient_holders(parameters)
                break
        return original(self, parameters, max_norm, norm_type)

    return clip_grad_norm_


# --- 8: --torch_compile compiles layer by layer -----------------------------------------------------------


def _wrap_prepare(original):
    no_backend = lookup(DYNAMO_BACKEND)[2].NO

    def prepare(self, *args, **kwargs):
        plugin = getattr(self.state, "dynamo_plugin", None)
        opts = [unwrap_optimizer(a) for a in args if hasattr(a, "step") and hasattr(a, "param_groups")]
        opt = next((o for o in opts if o is not None), None)
        if opt is None or plugin is None or plugin.backend == no_backend:
            return original(self, *args, **kwargs)
        compile_layers(opt.model, opt.partition, **plugin.to_kwargs())
        backend, plugin.backend = plugin.backend, no_backend  # accelerate must not compile the whole model
        try:
            return original(self, *args, **kwargs)
        finally:
            plugin.backend = backend

    return prepare


# --- install --------------------------------------------------------------------------------------------

_construction_check: list = []


def install() -> None:
    """Apply every patch (idempotent). Raises `UnsupportedVersionError` for a missing target; a missing
    optional engine's target refuses that engine later (see the module docstring)."""
    lookup(DYNAMO_BACKEND)  # read by 8: checked now, not at the first prepare
    member = _add_enum_member(lookup(ENUM)[2], MEMBER_NAME, OPTIM_NAME)
    handlers = lookup(HANDLERS)[2]
    if not isinstance(handlers, dict):
        raise _missing(HANDLERS, f"it is a {type(handlers).__name__}, not a dict")
    handlers[member] = _badam_handler
    _replace(POST_INIT, _wrap_post_init)
    _replace(CREATE_OPTIMIZER, _wrap_create_optimizer)
    _replace(CLIP, _wrap_clip)
    _replace(PREPARE, _wrap_prepare)
    _unavailable.clear()
    for target in FSDP_IO:
        _replace_optional(target, _wrap_fsdp_save if target.attrs[-1].startswith("save") else _wrap_fsdp_load)
    _replace_optional(DEEPSPEED_LOAD, _wrap_deepspeed_load)
    if not _construction_check:
        _construction_check.append(BlockOptimizer.register_construction_check(_refuse_unpatched_engine))
