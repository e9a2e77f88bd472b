"""FSDP2 glue: BAdam over a model sharded with `torch.distributed.fsdp.fully_shard`.

Under FSDP2 every parameter is a DTensor holding this rank's shard. `BlockOptimizer` keeps the fp32
master and the inner optimizer's moments for the *local shards* of the active block only (see
`badam_hf.core.masters`), so per GPU the optimizer side costs 16 bytes x active-block params / N.
Toggling `requires_grad` between steps is otherwise fine under FSDP2: only the parameter groups that
require grad are reduce-scattered. One thing is not: each FSDP parameter group fixes its mixed-precision
dtypes (which dtype the gradients are reduced and stored in) from the parameters that required grad at
its lazy init, i.e. at the first forward. A group frozen then has no dtypes: once its layer becomes
active, its gradients are reduced in the compute dtype instead of the policy's reduce dtype (silently),
and with fp32 shards computed in bf16 the backward fails ("attempting to assign a gradient with dtype
BFloat16 to a tensor with grad_dtype Float", pytorch issue 186998). `FSDP2BlockSync` therefore re-derives
every group's mixed-precision dtypes after each switch, and checks that all ranks train the same block.

Plain PyTorch loop (the optimizer may be built before or after sharding: it picks up the DTensors that
replace the parameters):

    for layer in model.model.layers:
        fully_shard(layer, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    fully_shard(model, mp_policy=...)
    opt = BlockOptimizer(model, lr=1e-5, switch_every=50)
    attach_fsdp2(model, opt)
    for batch in loader:
        model(**batch).loss.backward(); opt.step(); opt.zero_grad()

Checkpoints are sharded: `opt.state_dict()` holds this rank's shards (save one file per rank, load it
with the same number of ranks), and the model's DTensor state dict goes through
`torch.distributed.checkpoint` as usual.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from .common import (
    DistributedSetupError,
    accelerate_fsdp_plugin,
    all_reduce_max,
    check_same_block,
    engine_sync,
    holds_parameters,
    install_sync,
    read_optimizer_state,
    require_block_optimizer,
)


def fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _param_groups(module: nn.Module) -> list:
    """The FSDPParamGroups of one fully_shard-ed module (torch 2.13 may hold several per module)."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # older torch: at most one group per module
        group = getattr(state, "_fsdp_param_group", None)
        groups = [group] if group is not None else []
    return list(groups)


def check_fsdp2_internals(model: nn.Module) -> None:
    """Refuse (rather than fail mid-run) if this torch's FSDP2 lacks what the dtype refresh uses."""
    modules = fsdp2_modules(model)
    if not modules:
        raise DistributedSetupError("attach_fsdp2 needs a model sharded with torch.distributed.fsdp.fully_shard.")
    try:
        groups = [g for m in modules for g in _param_groups(m)]
        ok = all(callable(getattr(g, "_init_mp_dtypes", None)) for g in groups)
    except AttributeError:
        ok = False
    if not ok:
        raise DistributedSetupError(
            f"this torch version ({torch.__version__}) changed the FSDP2 internals that BAdam uses to refresh the "
            "mixed-precision dtypes of newly activated blocks (FSDPState._fsdp_param_groups / "
            "FSDPParamGroup._init_mp_dtypes); the first switch would fail, so it is refused up front. Use a torch "
            "version badam_hf supports (2.6 to 2.13), or DDP."
        )


class FSDP2BlockSync:
    """Switch hook: all ranks agree on the block, then every FSDP group re-derives its dtypes."""

    engine_name = "FSDP2"

    def __init__(self, model: nn.Module, check_agreement: bool = True):
        self.model = model
        self.check_agreement = check_agreement
        self.refreshes = 0
        self.total_refresh_ms = 0.0

    def refresh(self) -> None:
        start = time.perf_counter()
        for module in fsdp2_modules(self.model):
            for group in _param_groups(module):
                group._init_mp_dtypes()
        self.refreshes += 1
        self.total_refresh_ms += (time.perf_counter() - start) * 1000.0

    def reduce_max(self, flag: torch.Tensor) -> None:
        """The ranks' common verdict on a non-finite step: each rank checked only its own shards."""
        all_reduce_max(flag, self._opt_for_flags)

    def __call__(self, opt) -> None:
        self._opt_for_flags = opt
        if self.check_agreement and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            check_same_block(opt, group=None)
        self.refresh()


def attach_fsdp2(model: nn.Module, optimizer, check_agreement: bool = True) -> FSDP2BlockSync:
    """Keep an FSDP2 (`fully_shard`) model consistent with BAdam's block switches: refresh now and after
    every switch. Idempotent. `model` is the sharded root module the optimizer was built on."""
    opt = require_block_optimizer(optimizer, "attach_fsdp2")
    current = engine_sync(opt)
    if isinstance(current, FSDP2BlockSync) and current.model is model:
        return current
    opt.rebind_parameters()  # built before fully_shard: pick up the DTensors that replaced the parameters
    if not holds_parameters(model, opt):
        raise DistributedSetupError(
            "the FSDP2 model is not the model this BlockOptimizer trains; attach the sharded root module that the "
            "optimizer was built on (fully_shard shards a module in place)."
        )
    check_fsdp2_internals(model)
    return install_sync(opt, FSDP2BlockSync(model, check_agreement=check_agreement))


# --- accelerate / HF Trainer ------------------------------------------------------------------------------


def check_accelerate_mixed_precision(model: nn.Module) -> None:
    """accelerate's FSDP2 with mixed_precision bf16 upcasts to fp32 only the parameters that require grad when
    it shards the model. With BAdam that is the first block alone, which leaves a model of mixed dtypes and
    an fp32 copy of one layer for the whole run. Refuse the combination before anything changes."""
    plugin = accelerate_fsdp_plugin()
    if plugin is None or getattr(plugin, "fsdp_version", 1) != 2:
        return
    from accelerate.state import AcceleratorState

    mixed = AcceleratorState._shared_state.get("_mixed_precision", "no")
    low = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if mixed != "no" and low:
        raise DistributedSetupError(
            f"FSDP2 through accelerate with mixed_precision={mixed!r} (TrainingArguments bf16=True) and {low[0]} "
            "weights: accelerate would upcast only the block that is trainable when it shards the model (BAdam's "
            "first block) to float32, leaving the other blocks in low precision. BAdam already keeps float32 masters "
            "for the active block, so train the bfloat16 weights with bf16=False (accelerate mixed_precision: 'no'); "
            "or load float32 weights to keep bf16=True."
        )


_SHARD_DIR = "optimizer_badam"  # contains "optimizer", which is what the Trainer looks for when resuming


def shard_file(directory: str, rank: int, world: int) -> str:
    return os.path.join(directory, _SHARD_DIR, f"rank{rank}-of-{world}.pt")


def save_sharded_optimizer(optimizer, output_dir: str) -> str:
    """One file per rank: a BlockOptimizer's masters and moments under FSDP2 are this rank's shards."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    path = shard_file(output_dir, rank, world)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(optimizer.state_dict(), path)
    return path


def load_sharded_optimizer(optimizer, input_dir: str) -> None:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    path = shard_file(input_dir, rank, world)
    if not os.path.isfile(path):
        found = sorted(os.listdir(os.path.dirname(path))) if os.path.isdir(os.path.dirname(path)) else []
        raise FileNotFoundError(
            f"no BAdam optimizer shard {path} for rank {rank} of {world}"
            + (f" (the checkpoint has {found[:2]}...: it was saved with a different number of processes)" if found else "")
            + "; resume with the number of processes that saved the checkpoint."
        )
    fix = (f"delete the folder {os.path.dirname(path)} to resume without optimizer state (the Adam moments and the "
           "learning-rate schedule then restart, with a warning).")
    optimizer.load_state_dict(read_optimizer_state(path, fix=fix))
