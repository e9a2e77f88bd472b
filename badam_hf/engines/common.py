"""What every engine's glue shares: the world size, which engine a model is under, the record of the sync
attached to an optimizer, and the check that all ranks train the same block.

An engine's sync is a switch hook (see `BlockOptimizer.register_switch_hook`) that keeps the engine's own
bookkeeping (DDP's reducer, FSDP2's mixed-precision dtypes, ZeRO-3's partitions) on the active block.
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import nn

from ..core.errors import CheckpointReadError, DistributedSetupError
from ..core.optimizer import BlockOptimizer, unwrap_optimizer

__all__ = [
    "accelerate_fsdp_plugin",
    "all_reduce_max",
    "read_optimizer_state",
    "accelerate_state_ready",
    "engine_from_environment",
    "unsupported_engine",
    "DistributedSetupError",
    "check_mode_supported",
    "check_same_block",
    "detach_sync",
    "engine_of",
    "engine_sync",
    "holds_parameters",
    "install_sync",
    "refuse_fsdp1",
    "require_block_optimizer",
    "set_engine_sync",
    "world_size",
]

# optimizer -> (sync, handle of its switch hook). Weak: the record goes with the optimizer.
_SYNCS: "weakref.WeakKeyDictionary[BlockOptimizer, tuple]" = weakref.WeakKeyDictionary()


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def class_names(obj) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def engine_of(model: nn.Module | None) -> str | None:
    """'FSDP' (version 1), 'FSDP2' or 'DeepSpeed' when `model` (a wrapper or the inner model) is under one."""
    if model is None:
        return None
    if "DeepSpeedEngine" in class_names(model):
        return "DeepSpeed"
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    for m in modules:
        names = class_names(m)
        if "FullyShardedDataParallel" in names:
            return "FSDP"
        if "FSDPModule" in names:
            return "FSDP2"
    if isinstance(model, nn.Module) and any(hasattr(p, "ds_id") for p in model.parameters()):
        return "DeepSpeed"
    return None


def accelerate_fsdp_plugin():
    """The FSDP plugin accelerate is using in this process, or None (also when accelerate decided against
    FSDP, e.g. on CPU, where it falls back to DDP)."""
    try:
        from accelerate.state import AcceleratorState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return None
    return AcceleratorState._shared_state.get("fsdp_plugin")


def accelerate_state_ready() -> bool:
    try:
        from accelerate.state import AcceleratorState
    except ImportError:  # pragma: no cover
        return False
    return bool(AcceleratorState._shared_state)


def engine_from_environment() -> str | None:
    # Set by `accelerate launch` and by TrainingArguments when --deepspeed / --fsdp is configured.
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return "DeepSpeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        plugin = accelerate_fsdp_plugin()  # the Trainer's fsdp_config sets no FSDP_VERSION variable
        if plugin is not None:
            return "FSDP2" if getattr(plugin, "fsdp_version", 1) == 2 else "FSDP"
        if accelerate_state_ready():
            return None  # accelerate chose no FSDP (it falls back to DDP on CPU)
        return "FSDP2" if os.environ.get("FSDP_VERSION", "1") == "2" else "FSDP"
    return None


def unsupported_engine(model: nn.Module | None) -> str | None:
    """The engine of `model` (or of the launch environment) when BAdam cannot train under it, else None."""
    engine = engine_of(model) or engine_from_environment()
    return engine if engine == "FSDP" else None


def refuse_fsdp1() -> None:
    raise DistributedSetupError(
        "BAdam does not support FSDP (FSDP version 1): it flattens each wrapped module's parameters into "
        "one buffer when it wraps the model, so the block switches (which change which parameters train) would "
        "be silently lost or desynchronised. Use FSDP2 (accelerate config `fsdp_version: 2`, or "
        "torch.distributed.fsdp.fully_shard + badam_hf.fsdp.attach_fsdp2), DistributedDataParallel, or one "
        "process."
    )


def require_block_optimizer(optimizer, what: str) -> BlockOptimizer:
    opt = unwrap_optimizer(optimizer)
    if opt is None:
        raise TypeError(f"{what} needs a badam_hf BlockOptimizer, got {type(optimizer).__name__}.")
    return opt


def engine_sync(opt: BlockOptimizer):
    """The engine sync attached to `opt` (DDPBlockSync, FSDP2BlockSync, DeepSpeedBlockSync), or None."""
    entry = _SYNCS.get(opt)
    return None if entry is None else entry[0]


def set_engine_sync(opt: BlockOptimizer, sync) -> None:
    """Record `sync` as attached without registering it as a switch hook (a single-process reference run
    inside a multi-process group, which must not be refused by the first-step guard)."""
    detach_sync(opt)
    _SYNCS[opt] = (sync, _NoHandle())


class _NoHandle:
    def remove(self) -> None:
        pass


def check_same_block(opt, group=None) -> None:
    """All ranks must train the same block(s) (and, in mode ratio, draw the same masks: same step and seed);
    a mismatch (e.g. different seeds) would hang or diverge."""
    device = local_device(opt, group)
    mine = [opt.global_step, opt.config.schedule.seed, len(opt.active_blocks), *opt.active_blocks]
    n = torch.tensor([len(mine)], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX, group=group)
    padded = mine + [-1] * (int(n) - len(mine))
    t = torch.tensor(padded + [-v for v in padded], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
    high, low = t[: len(padded)].tolist(), [-v for v in t[len(padded):].tolist()]
    if high != low:
        here = opt.active_block if len(opt.active_blocks) == 1 else list(opt.active_blocks)
        raise DistributedSetupError(
            f"the ranks train different blocks (this rank: {here} at step {opt.global_step}; "
            f"[step, seed, count, blocks...] ranges over ranks from {low} to {high}); give every rank the same "
            "BAdam settings (mode, switch_mode, seed, start_block) and the same step count."
        )


def check_mode_supported(opt, engine: str) -> None:
    """Refuse, before training, what an engine cannot run: BREAD's inactive step anywhere distributed (the
    engines synchronise the active block only: each rank would step its inactive layers with its own
    gradient), and modes ratio/lisa under ZeRO-3."""
    if opt.config.inactive.enabled:
        raise DistributedSetupError(
            f"inactive_update={opt.config.inactive.inactive_update!r} is not supported under {engine}: the inactive "
            "layers would take their step from this rank's own gradient (the engine synchronises the active block "
            "only), so the replicas would drift apart. Train with inactive_update=none, or in one process."
        )
    if engine.startswith("DeepSpeed") and opt.config.switch_rounding == "stochastic":
        raise DistributedSetupError(
            f"switch_rounding={opt.config.switch_rounding!r} is not supported under DeepSpeed ZeRO-3 (ZeRO-3 owns the "
            "fp32 masters and writes them into the weights itself); use switch_rounding=auto or nearest there (both round "
            "to nearest under ZeRO-3), or DDP / FSDP2."
        )
    if engine.startswith("DeepSpeed") and opt.mode != "layer":
        raise DistributedSetupError(
            f"mode={opt.mode!r} is not supported under DeepSpeed ZeRO-3 (ZeRO-3 owns the masters of whole "
            "parameters); use mode=layer there, or DDP / FSDP2 for modes ratio and lisa."
        )


def local_device(opt, group=None) -> torch.device:
    """Where a small collective of this group can run (NCCL needs CUDA tensors)."""
    device = next(iter(opt.params_by_name.values())).device
    if torch.distributed.get_backend(group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def read_optimizer_state(path: str, fix: str | None = None, mmap: bool = False, weights_only: bool = True) -> dict:
    """`torch.load` of an optimizer checkpoint file, refusing an unreadable one with a message that names the
    file and what to do (torch's own says neither: `PytorchStreamReader failed ...`, a bare `EOFError`)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except Exception as e:  # any failure to read is the same for the user: this file is damaged
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointReadError(
            f"cannot read the optimizer state {path} ({type(e).__name__}: {reason}); the file is empty, truncated or "
            "not a torch checkpoint. Resume from an earlier checkpoint, or "
            + (fix or f"delete {path} to resume without it (the Adam moments and the learning-rate schedule then "
               "restart, with a warning).")
        ) from e
    if not isinstance(state, dict):
        raise CheckpointReadError(f"the optimizer state {path} holds a {type(state).__name__}, not a state dict; "
                                  "resume from an earlier checkpoint.")
    return state


def all_reduce_max(flag: torch.Tensor, opt, group=None) -> None:
    """`flag` (one element) becomes its maximum over the group's ranks, in place."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1):
        return
    t = flag.to(local_device(opt, group))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
    flag.copy_(t)


def holds_parameters(module: nn.Module, opt) -> bool:
    """Whether `module` holds every parameter the optimizer trains (it wraps the optimizer's model)."""
    mine = {id(p) for p in module.parameters()}
    return all(id(p) in mine for p in opt.params_by_name.values())


def detach_sync(opt: BlockOptimizer) -> None:
    """Unregister the attached sync (an engine replacing it must not have the old one fire meanwhile)."""
    old = _SYNCS.pop(opt, None)
    if old is not None:
        old[1].remove()


class _Handles:
    def __init__(self, handles):
        self._handles = list(handles)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()


def install_sync(opt: BlockOptimizer, sync):
    """Make `sync` the optimizer's engine hook, replacing an earlier one (re-attached to a new wrapper, e.g.
    by a second train() call), and run it once now for the block that is active. A sync with a
    `keeps_grads()` method is also registered as the optimizer's grad-keep check (see
    `BlockOptimizer.register_grad_keep_check`), one with `reduce_max(flag)` as its flag reduce (the ranks'
    common verdict on a non-finite step)."""
    check_mode_supported(opt, getattr(sync, "engine_name", type(sync).__name__))
    detach_sync(opt)
    sync(opt)
    handles = [opt.register_switch_hook(sync)]
    if callable(getattr(sync, "keeps_grads", None)):
        handles.append(opt.register_grad_keep_check(sync.keeps_grads))
    if callable(getattr(sync, "reduce_max", None)):
        handles.append(opt.register_flag_reduce(sync.reduce_max))
    _SYNCS[opt] = (sync, _Handles(handles))
    return sync
