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


def flat_fp32_like(tensors: list[torch.Tensor], copy: bool = False) -> list[torch.Tensor]:
    """fp32 tensors shaped like `tensors` (their local shards), as views of one contiguous buffer per device.
    One allocation per block instead of one per tensor: a switch frees it whole (nothing left behind for
    the allocator to fragment), and its size is exactly 4 bytes x the block's (local) elements. `copy`
    fills each view with its tensor's values."""
    locals_ = [local_shard(t.detach()) for t in tensors]
    out: list[torch.Tensor | None] = [None] * len(locals_)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(locals_):
        by_device.setdefault(t.device, []).append(i)
    with torch.no_grad():
        for device, idx in by_device.items():
            flat = torch.empty(sum(locals_[i].numel() for i in idx), dtype=torch.float32, device=device)
            offset = 0
            for i in idx:
                n = locals_[i].numel()
                out[i] = flat[offset:offset + n].view(locals_[i].shape)
                if copy:
                    out[i].copy_(locals_[i])
                offset += n
    return out


def make_flat_masters(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 masters of `params` (see `flat_fp32_like`)."""
    return flat_fp32_like(params, copy=True)


@torch.no_grad()
def grads_to_masters(params: list[torch.Tensor], masters: list[torch.Tensor], buffers=None) -> None:
    """Move each low-precision grad that is still on its parameter up to its master (fp32) and free the
    low-precision one. A master whose gradient already arrived in fp32 (the post-accumulate-grad path) keeps
    it, adding what the parameter holds, if anything. `buffers[i]`, when given, is where master i's fp32
    gradient lives (a view of the block's gradient buffer, see `flat_fp32_like`); else a new tensor is made."""
    for i, (p, m) in enumerate(zip(params, masters)):
        if p.grad is None:
            continue
        g = local_shard(p.grad)
        if m.grad is not None:
            m.grad.add_(g)
        elif buffers is not None:
            m.grad = buffers[i].copy_(g)
        else:
            m.grad = g.to(torch.float32)
        p.grad = None


@torch.no_grad()
def masters_to_params(params: list[torch.Tensor], masters: list[torch.Tensor]) -> None:
    """Write the updated masters back into the model's weights (or local shards); drop the master grads."""
    for p, m in zip(params, masters):
        local_shard(p).copy_(m)
        m.grad = None
