"""The functional core of mixed precision: fp32 masters for low-precision weights (or local shards).

A sharded parameter (a DTensor, e.g. under FSDP2) holds this rank's shard; its master, moments and the
gradient the inner optimizer sees are plain tensors over the local shard, so each rank keeps state for 1/N
of the block. Nothing here knows which engine sharded the tensor.
"""

from __future__ import annotations

import torch


def is_sharded(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (a DTensor's local shard, which shares its storage), else `t` itself."""
    return t.to_local() if is_sharded(t) else t


def needs_master(param: torch.Tensor) -> bool:
    # A sharded tensor always gets a plain local master: the inner optimizer's state then stays per-rank plain
    # tensors, whatever the weights' dtype (for fp32 weights that costs 4 bytes per local active element).
    return param.dtype != torch.float32 or is_sharded(param)


@torch.no_grad()
def make_master(param: torch.Tensor) -> torch.Tensor:
    return local_shard(param.detach()).to(torch.float32, copy=True)


@torch.no_grad()
def grads_to_masters(params: list[torch.Tensor], masters: list[torch.Tensor]) -> None:
    """Move each low-precision grad up to its master (fp32) and free the low-precision one."""
    for p, m in zip(params, masters):
        m.grad = None if p.grad is None else local_shard(p.grad).to(torch.float32)
        p.grad = None


@torch.no_grad()
def masters_to_params(params: list[torch.Tensor], masters: list[torch.Tensor]) -> None:
    """Write the updated masters back into the model's weights (or local shards); drop the master grads."""
    for p, m in zip(params, masters):
        local_shard(p).copy_(m)
        m.grad = None
