"""Which engine a model is under, and what follows: the refusals at construction and at the first step,
attaching the Hugging Face Trainer's wrapped model to its engine, and the DeepSpeed config check at
argument parsing. `install()` plugs these into `BlockOptimizer`'s extension points (importing badam_hf
does it); the engines themselves live in `ddp`, `fsdp2` and `deepspeed`.

Not supported (refused, in any number of processes): FSDP version 1, which flattens parameters into one
buffer per wrapped module at wrap time. In more than one process, a BlockOptimizer built before
`init_process_group` is refused, and one whose model was never attached to an engine's sync refuses its
first step. Every rank must use the same BAdam settings; `attach_ddp` checks at each switch (one tiny
all-reduce) that all ranks train the same block.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..core.optimizer import BlockOptimizer, unwrap_optimizer
from . import deepspeed as _deepspeed
from .common import (
    DistributedSetupError,
    engine_from_environment,
    engine_of,
    engine_sync,
    refuse_fsdp1,
    unsupported_engine,
    world_size,
)
from .ddp import attach_ddp
from .fsdp2 import attach_fsdp2, check_accelerate_mixed_precision


def check_engine(model: nn.Module) -> None:
    """Construction check of every BlockOptimizer, before it changes the model: refuse FSDP version 1, an
    engine setup BAdam cannot train with, and more than one process without an initialised process group
    (so no DDP / FSDP2 glue can follow)."""
    engine = engine_of(model) or engine_from_environment()
    if engine == "FSDP":
        refuse_fsdp1()
    if engine == "FSDP2":
        check_accelerate_mixed_precision(model)  # no partial fp32 upcast by accelerate
    if engine == "DeepSpeed":
        _deepspeed.check_construction(model)  # ZeRO-3 only, tested versions, no "optimizer" block
    n = world_size()
    if n > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise DistributedSetupError(
            f"BAdam is running in {n} processes (WORLD_SIZE={n}) but torch.distributed is not initialised, so "
            "the ranks cannot be kept in sync. Call torch.distributed.init_process_group() first, then build the "
            "BlockOptimizer, wrap the model in DistributedDataParallel and call "
            "`badam_hf.distributed.attach_ddp(ddp_model, optimizer)` (the Hugging Face Trainer does all of this)."
        )


def install_step_guard(opt: BlockOptimizer) -> None:
    """Init hook of every BlockOptimizer: at its first step, refuse more than one process without an attached
    engine sync, and a DeepSpeed engine driving it without `attach_deepspeed`."""

    checked = []  # the hook cannot remove itself while torch iterates over the hooks

    def guard(o, args, kwargs):
        if checked:
            return
        if o.driver is None and any(hasattr(p, "ds_id") for p in o.params_by_name.values()):
            _deepspeed.refuse_unattached(o)
        if engine_sync(o) is None and world_size() > 1:
            raise DistributedSetupError(
                f"BAdam is running in {world_size()} processes but its model was not attached to a distributed "
                "engine. DDP only synchronises the parameters that required grad when it built its reducer, and "
                "BAdam changes them at every block switch, so the ranks would silently diverge. Wrap the model "
                "and call `badam_hf.distributed.attach_ddp(ddp_model, optimizer)` (DistributedDataParallel) or "
                "`badam_hf.fsdp.attach_fsdp2(model, optimizer)` (fully_shard) or "
                "`badam_hf.deepspeed_zero3.attach_deepspeed(engine, optimizer)` (DeepSpeed ZeRO-3) before training "
                "(the Hugging Face Trainer does this by itself through BAdamCallback)."
            )
        checked.append(True)  # refused steps stay refused; a passed check is not repeated

    opt.register_step_pre_hook(guard)


def attach_wrapped_model(wrapped, optimizer):
    """Trainer glue: attach the Trainer's wrapped model to its engine's sync (DDP, FSDP2 or DeepSpeed);
    refuse FSDP1."""
    opt = unwrap_optimizer(optimizer)
    if opt is None or wrapped is None:
        return None
    if isinstance(wrapped, DistributedDataParallel):
        return attach_ddp(wrapped, opt)
    if engine_of(wrapped) == "FSDP2":
        return attach_fsdp2(wrapped, opt)
    if engine_of(wrapped) == "DeepSpeed":
        return _deepspeed.attach_deepspeed(wrapped, opt)
    if unsupported_engine(wrapped) is not None:
        refuse_fsdp1()
    return None  # one process, or a setup the first-step guard refuses


def check_training_args(args) -> None:
    """A DeepSpeed config BAdam cannot train with (e.g. its own "optimizer" block, which would silently
    replace BAdam) fails with the arguments, before any model is loaded."""
    if getattr(args, "deepspeed", None):
        _deepspeed.check_training_args(args)


_installed: list = []


def install() -> None:
    """Plug the engine checks into every BlockOptimizer built from now on (idempotent)."""
    if not _installed:
        _installed.append(BlockOptimizer.register_construction_check(check_engine))
        _installed.append(BlockOptimizer.register_init_hook(install_step_guard))


def uninstall() -> None:
    while _installed:
        _installed.pop().remove()
