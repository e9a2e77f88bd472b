"""BAdam under DistributedDataParallel (DDP).

DDP registers its gradient all-reduce hooks only for the parameters that require grad when it builds
its reducer. BAdam toggles `requires_grad` at every block switch, so a block unfrozen later would never be
all-reduced (ranks silently diverge), and a block frozen later leaves the reducer waiting for gradients
that never come. `attach_ddp` fixes both: after every block (re)activation it rebuilds the DDP reducer
in place over the parameters that are trainable now, so only the active block's gradients are bucketed
and all-reduced (a rebuild takes about a millisecond on a small model). With gradient accumulation, the
micro-batches under `no_sync()` accumulate in fp32 on the masters; the last one hands the reducer their
sum, rounded once to the weights' dtype (DDP all-reduces in the parameters' dtype). The rebuild follows what
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
"""

from __future__ import annotations

import inspect
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from .common import (
    DistributedSetupError,
    all_reduce_max,
    check_same_block,
    engine_sync,
    holds_parameters,
    install_sync,
    refuse_fsdp1,
    require_block_optimizer,
    unsupported_engine,
    world_size,
)

# What the in-place rebuild needs from DistributedDataParallel (present in torch 2.x; see __setstate__).
_DDP_METHODS = ("_build_params_for_reducer", "_build_debug_param_to_name_mapping", "_ddp_init_helper")
_DDP_ATTRIBUTES = ("reducer", "logger", "static_graph", "module", "process_group")
_INIT_HELPER_ARGS = ["parameters", "expect_sparse_gradient", "param_to_name_mapping", "static_graph"]


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

    engine_name = "DDP"

    def __init__(self, ddp, check_agreement: bool = True):
        self.ddp = ddp
        self._registered: tuple[int, ...] | None = None  # ids of the parameters the reducer was built over
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

    def keeps_grads(self) -> bool:
        """True during a backward whose gradients DDP all-reduces (not under `no_sync()`): BAdam's fp32
        gradient accumulation then leaves the micro-batches' fp32 sum, rounded once to the weights' dtype, on
        the parameters for the reducer, instead of taking the gradient (micro-batches under `no_sync()` are
        accumulated in fp32 on the masters as in one process)."""
        return bool(self.ddp.require_backward_grad_sync)

    def reduce_max(self, flag: torch.Tensor) -> None:
        """The ranks' common verdict on a non-finite step (their gradients agree after the all-reduce, but
        a rank must never step alone)."""
        all_reduce_max(flag, self._opt_for_flags, self.ddp.process_group)

    def __call__(self, opt) -> None:
        self._opt_for_flags = opt
        if self.check_agreement and torch.distributed.is_initialized() and world_size() > 1:
            check_same_block(opt, self.ddp.process_group)
        trainable = tuple(id(p) for p in self.ddp.module.parameters() if p.requires_grad)
        if trainable != self._registered:  # mode ratio keeps every matrix trainable: nothing to rebuild
            self.rebuild()
            self._registered = trainable


def attach_ddp(ddp_module, optimizer, check_agreement: bool = True) -> DDPBlockSync:
    """Keep `ddp_module` (a DistributedDataParallel wrapping the optimizer's model) synchronising exactly
    the active block: rebuild its reducer now and after every block switch. Idempotent.

    `check_agreement` adds one tiny all-reduce per switch verifying that all ranks train the same block.
    """
    opt = require_block_optimizer(optimizer, "attach_ddp")
    if not isinstance(ddp_module, DistributedDataParallel):
        if unsupported_engine(ddp_module) is not None:
            refuse_fsdp1()
        raise TypeError(f"attach_ddp needs a DistributedDataParallel module, got {type(ddp_module).__name__}.")
    current = engine_sync(opt)
    if isinstance(current, DDPBlockSync) and current.ddp is ddp_module:
        return current
    if not holds_parameters(ddp_module.module, opt):
        raise DistributedSetupError(
            "the DistributedDataParallel module does not wrap the model this BlockOptimizer trains; wrap the "
            "same model object the optimizer was built on."
        )
    _check_ddp_internals(ddp_module)
    return install_sync(opt, DDPBlockSync(ddp_module, check_agreement=check_agreement))


