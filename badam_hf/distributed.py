"""Distributed glue: engine detection and refusals, and BAdam under DistributedDataParallel (DDP).

FSDP2 lives in `badam_hf.fsdp`, DeepSpeed ZeRO-3 in `badam_hf.deepspeed_zero3`; this module decides which
one a model is under and refuses what cannot train correctly.

DDP registers its gradient all-reduce hooks only for the parameters that require grad when it builds
its reducer. BAdam toggles `requires_grad` at every block switch, so a block unfrozen later would never be
all-reduced (ranks silently diverge), and a block frozen later leaves the reducer waiting for gradients
that never come. `attach_ddp` fixes both: after every block (re)activation it rebuilds the DDP reducer
in place over the parameters that are trainable now, so only the active block's gradients are bucketed
and all-reduced (a rebuild takes about a millisecond on a small model). The rebuild follows what
`DistributedDataParallel.__setstate__` does and therefore uses DDP internals; when they are missing (a
torch version whose DDP changed), `attach_ddp` refuses with a clear error instead of training unsynced.

Plain PyTorch loop (DDP may wrap the model before or after the optimizer is built: the attach rebuilds
the reducer at once; a DDP wrapped after it alone would only ever see the first block):

    torch.distributed.init_process_group(...)
    opt = BlockOptimizer(model, lr=1e-5, switch_every=50)
    ddp = DistributedDataParallel(model)
    attach_ddp(ddp, opt)
    for batch in loader:
        ddp(**batch).loss.backward(); opt.step(); opt.zero_grad()

Hugging Face Trainer (`BAdamTrainer`, `make_badam_trainer(...)` or `--optim badam`) under torchrun or
`accelerate launch`: nothing to do; the `BAdamCallback` attaches the Trainer's DDP model at train begin.

Not supported (refused, in any number of processes): FSDP version 1, which flattens parameters into one
buffer per wrapped module at wrap time. In more than one process, a BlockOptimizer built before
`init_process_group` is refused, and one whose model was never attached to an engine's sync refuses its
first step. Every rank must use the same BAdam settings; `attach_ddp` checks at each switch (one tiny
all-reduce) that all ranks train the same block.
"""

from __future__ import annotations

import inspect
import os
import time

import torch
from torch import nn

# What the in-place rebuild needs from DistributedDataParallel (present in torch 2.x; see __setstate__).
_DDP_METHODS = ("_build_params_for_reducer", "_build_debug_param_to_name_mapping", "_ddp_init_helper")
_DDP_ATTRIBUTES = ("reducer", "logger", "static_graph", "module", "process_group")
_INIT_HELPER_ARGS = ["parameters", "expect_sparse_gradient", "param_to_name_mapping", "static_graph"]


class DistributedSetupError(RuntimeError):
    """BAdam cannot train correctly under this distributed setup; raised before any step is taken."""


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


# --- engine detection ---------------------------------------------------------------------------------


def _class_names(obj) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def engine_of(model: nn.Module | None) -> str | None:
    """'FSDP' (version 1), 'FSDP2' or 'DeepSpeed' when `model` (a wrapper or the inner model) is under one."""
    if model is None:
        return None
    if "DeepSpeedEngine" in _class_names(model):
        return "DeepSpeed"
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    for m in modules:
        names = _class_names(m)
        if "FullyShardedDataParallel" in names:
            return "FSDP"
        if "FSDPModule" in names:
            return "FSDP2"
    if isinstance(model, nn.Module) and any(hasattr(p, "ds_id") for p in model.parameters()):
        return "DeepSpeed"
    return None


def _engine_from_environment() -> str | None:
    # Set by `accelerate launch` and by TrainingArguments when --deepspeed / --fsdp is configured.
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return "DeepSpeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        from .fsdp import accelerate_fsdp_plugin, accelerate_state_ready

        plugin = accelerate_fsdp_plugin()  # the Trainer's fsdp_config sets no FSDP_VERSION variable
        if plugin is not None:
            return "FSDP2" if getattr(plugin, "fsdp_version", 1) == 2 else "FSDP"
        if accelerate_state_ready():
            return None  # accelerate chose no FSDP (it falls back to DDP on CPU)
        return "FSDP2" if os.environ.get("FSDP_VERSION", "1") == "2" else "FSDP"
    return None


def unsupported_engine(model: nn.Module | None) -> str | None:
    """The engine of `model` (or of the launch environment) when BAdam cannot train under it, else None."""
    engine = engine_of(model) or _engine_from_environment()
    return engine if engine == "FSDP" else None


def _refuse_engine(engine: str) -> None:
    raise DistributedSetupError(
        f"BAdam does not support {engine} (FSDP version 1): it flattens each wrapped module's parameters into "
        "one buffer when it wraps the model, so the block switches (which change which parameters train) would "
        "be silently lost or desynchronised. Use FSDP2 (accelerate config `fsdp_version: 2`, or "
        "torch.distributed.fsdp.fully_shard + badam_hf.fsdp.attach_fsdp2), DistributedDataParallel, or one "
        "process."
    )


def check_engine(model: nn.Module) -> None:
    """Called when a BlockOptimizer is built, before it changes the model: refuse FSDP version 1, and more
    than one process without an initialised process group (so no DDP / FSDP2 glue can follow)."""
    engine = engine_of(model) or _engine_from_environment()
    if engine == "FSDP":
        _refuse_engine(engine)
    if engine == "FSDP2":
        from .fsdp import check_accelerate_mixed_precision  # no partial fp32 upcast by accelerate

        check_accelerate_mixed_precision(model)
    if engine == "DeepSpeed":
        from .deepspeed_zero3 import check_construction  # ZeRO-3 only, tested versions, no "optimizer" block

        check_construction(model)
    n = world_size()
    if n > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise DistributedSetupError(
            f"BAdam is running in {n} processes (WORLD_SIZE={n}) but torch.distributed is not initialised, so "
            "the ranks cannot be kept in sync. Call torch.distributed.init_process_group() first, then build the "
            "BlockOptimizer, wrap the model in DistributedDataParallel and call "
            "`badam_hf.distributed.attach_ddp(ddp_model, optimizer)` (the Hugging Face Trainer does all of this)."
        )


# --- the first-step guard ---------------------------------------------------------------------------


def install_step_guard(optimizer) -> None:
    """Refuse the first step in more than one process unless the optimizer was attached to a DDP wrapper."""

    def guard(opt, args, kwargs):
        if getattr(opt, "_badam_sync", None) is None and world_size() > 1:
            raise DistributedSetupError(
                f"BAdam is running in {world_size()} processes but its model was not attached to a distributed "
                "engine. DDP only synchronises the parameters that required grad when it built its reducer, and "
                "BAdam changes them at every block switch, so the ranks would silently diverge. Wrap the model "
                "and call `badam_hf.distributed.attach_ddp(ddp_model, optimizer)` (DistributedDataParallel) or "
                "`badam_hf.fsdp.attach_fsdp2(model, optimizer)` (fully_shard) or "
                "`badam_hf.deepspeed_zero3.attach_deepspeed(engine, optimizer)` (DeepSpeed ZeRO-3) before training "
                "(the Hugging Face Trainer does this by itself through BAdamCallback)."
            )
        handle.remove()

    handle = optimizer.register_step_pre_hook(guard)


def check_same_block(opt, group=None) -> None:
    """All ranks must train the same block; a mismatch (e.g. different seeds) would hang or diverge."""
    device = local_device(opt, group)
    t = torch.tensor([opt.active_block, -opt.active_block], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
    if int(t[0]) != -int(t[1]):
        raise DistributedSetupError(
            f"the ranks train different blocks (this rank: {opt.active_block}, range over ranks: "
            f"{-int(t[1])}..{int(t[0])}); give every rank the same BAdam settings (switch_mode, seed, "
            "start_block) and the same step count."
        )


def local_device(opt, group=None) -> torch.device:
    """Where a small collective of this group can run (NCCL needs CUDA tensors)."""
    device = next(iter(opt._params.values())).device
    if torch.distributed.get_backend(group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# --- DDP ------------------------------------------------------------------------------------------------


def _check_ddp_internals(ddp) -> None:
    missing = [a for a in _DDP_METHODS if not callable(getattr(ddp, a, None))]
    missing += [a for a in _DDP_ATTRIBUTES if not hasattr(ddp, a)]
    if not missing:
        params = list(inspect.signature(ddp._ddp_init_helper).parameters)
        if params != _INIT_HELPER_ARGS:
            missing.append(f"_ddp_init_helper{tuple(_INIT_HELPER_ARGS)} (found {tuple(params)})")
    if missing:
        raise DistributedSetupError(
            f"this torch version ({torch.__version__}) changed the DistributedDataParallel internals that BAdam "
            f"uses to re-register the active block at each switch (missing: {', '.join(missing)}). Training "
            "anyway would silently desynchronise the ranks, so it is refused. Use a torch version badam_hf "
            "supports (2.x with DDP's `_ddp_init_helper`), or train in one process."
        )
    unsupported = []
    if getattr(ddp, "mixed_precision", None) is not None:
        unsupported.append("mixed_precision=")
    if getattr(ddp, "_use_python_reducer", False):
        unsupported.append("the compiled (python) reducer")
    if getattr(ddp, "_delay_all_reduce_params", None) or getattr(ddp, "_delay_all_reduce_all_params", False):
        unsupported.append("delay_all_reduce_named_params=")
    if unsupported:
        raise DistributedSetupError(
            f"BAdam's DDP glue does not support DDP with {', '.join(unsupported)}; wrap the model with plain "
            "DistributedDataParallel (autocast works as usual)."
        )


class DDPBlockSync:
    """Switch hook that rebuilds a DDP wrapper's reducer over the currently trainable parameters."""

    def __init__(self, ddp, check_agreement: bool = True):
        self.ddp = ddp
        self.check_agreement = check_agreement
        self.rebuilds = 0
        self.last_rebuild_ms = 0.0
        self.total_rebuild_ms = 0.0

    def rebuild(self) -> None:
        ddp = self.ddp
        start = time.perf_counter()
        old = getattr(ddp, "reducer", None)
        if old is not None and hasattr(old, "_remove_autograd_hooks"):
            old._remove_autograd_hooks()  # no stale hook may fire into a reducer that is being dropped
        ddp.reducer = None
        ddp.logger = None
        parameters, expect_sparse_gradient = ddp._build_params_for_reducer()
        param_to_name_mapping = ddp._build_debug_param_to_name_mapping(parameters)
        ddp._ddp_init_helper(parameters, expect_sparse_gradient, param_to_name_mapping, ddp.static_graph)
        if ddp.static_graph:
            ddp.reducer._set_static_graph()
            ddp.logger._set_static_graph()
        # Communication hooks live on the reducer: register the user's (e.g. accelerate's bf16 compression)
        # again on the new one.
        hooks = list(getattr(ddp, "_comm_hooks", []) or [])
        if hooks:
            ddp._comm_hooks = []
            for hook, state in hooks:
                ddp.register_comm_hook(state, hook)
        self.rebuilds += 1
        self.last_rebuild_ms = (time.perf_counter() - start) * 1000.0
        self.total_rebuild_ms += self.last_rebuild_ms

    def __call__(self, opt) -> None:
        if self.check_agreement and torch.distributed.is_initialized() and world_size() > 1:
            check_same_block(opt, self.ddp.process_group)
        self.rebuild()


def attach_ddp(ddp_module, optimizer, check_agreement: bool = True) -> DDPBlockSync:
    """Keep `ddp_module` (a DistributedDataParallel wrapping the optimizer's model) synchronising exactly
    the active block: rebuild its reducer now and after every block switch. Idempotent.

    `check_agreement` adds one tiny all-reduce per switch verifying that all ranks train the same block.
    """
    from torch.nn.parallel import DistributedDataParallel

    from .optimizer import unwrap_optimizer  # optimizer.py imports this module

    opt = unwrap_optimizer(optimizer)
    if opt is None:
        raise TypeError(f"attach_ddp needs a badam_hf BlockOptimizer, got {type(optimizer).__name__}.")
    if not isinstance(ddp_module, DistributedDataParallel):
        if unsupported_engine(ddp_module) is not None:
            _refuse_engine("FSDP")
        raise TypeError(f"attach_ddp needs a DistributedDataParallel module, got {type(ddp_module).__name__}.")
    current = getattr(opt, "_badam_sync", None)
    if isinstance(current, DDPBlockSync) and current.ddp is ddp_module:
        return current
    if not holds_parameters(ddp_module.module, opt):
        raise DistributedSetupError(
            "the DistributedDataParallel module does not wrap the model this BlockOptimizer trains; wrap the "
            "same model object the optimizer was built on."
        )
    _check_ddp_internals(ddp_module)
    return install_sync(opt, DDPBlockSync(ddp_module, check_agreement=check_agreement))


def holds_parameters(module: nn.Module, opt) -> bool:
    """Whether `module` holds every parameter the optimizer trains (it wraps the optimizer's model)."""
    mine = {id(p) for p in module.parameters()}
    return all(id(p) in mine for p in opt._params.values())


def install_sync(opt, sync):
    """Make `sync` the optimizer's engine hook, replacing an earlier one (re-attached to a new wrapper, e.g.
    by a second train() call), and run it once now for the block that is active."""
    current = getattr(opt, "_badam_sync", None)
    if current in opt.switch_hooks:
        opt.switch_hooks.remove(current)
    sync(opt)
    opt.switch_hooks.append(sync)
    opt._badam_sync = sync
    return sync


def attach_wrapped_model(wrapped, optimizer):
    """Trainer glue: attach the Trainer's wrapped model to its engine's sync (DDP or FSDP2); refuse FSDP1."""
    from torch.nn.parallel import DistributedDataParallel

    from .optimizer import unwrap_optimizer  # optimizer.py imports this module

    opt = unwrap_optimizer(optimizer)
    if opt is None or wrapped is None:
        return None
    if isinstance(wrapped, DistributedDataParallel):
        return attach_ddp(wrapped, opt)
    if engine_of(wrapped) == "FSDP2":
        from .fsdp import attach_fsdp2

        return attach_fsdp2(wrapped, opt)
    if engine_of(wrapped) == "DeepSpeed":
        from .deepspeed_zero3 import attach_deepspeed

        return attach_deepspeed(wrapped, opt)
    engine = unsupported_engine(wrapped)
    if engine is not None:
        _refuse_engine(engine)
    return None  # one process, or a setup the first-step guard refuses
