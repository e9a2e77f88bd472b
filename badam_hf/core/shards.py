"""This rank's part of a tensor: a sharded parameter's local shard, the selected entries of a flattened
tensor (mode ratio), and tensors laid over one contiguous buffer. The layer below the masters, the ratio
selections and the rounding; nothing here knows which engine sharded a tensor.

A sharded parameter (a DTensor, e.g. under FSDP2) holds this rank's shard; its master, moments and the
gradient the inner optimizer sees are plain tensors over the local shard, so each rank keeps state for 1/N
of the block.
"""

from __future__ import annotations

import torch


def is_sharded(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (a DTensor's local shard, which shares its storage), else `t` itself."""
    return t.to_local() if is_sharded(t) else t


# Which entries of a tensor a ratio-mode master mirrors: a slice of the flattened tensor, an index tensor, or
# None for all of them (see `badam_hf.core.selection`).
Selection = slice | torch.Tensor


def selected(t: torch.Tensor, sel: Selection | None) -> torch.Tensor:
    """The selected entries of `t` (its local shard): a view for a slice, a gathered copy for indices."""
    t = local_shard(t)
    if sel is None:
        return t
    flat = t.view(-1)
    return flat[sel] if isinstance(sel, slice) else flat.index_select(0, sel)


@torch.no_grad()
def write_selected(t: torch.Tensor, sel: Selection | None, values: torch.Tensor) -> None:
    """Write `values` (rounded to `t`'s dtype) into the selected entries of `t`."""
    t = local_shard(t)
    if sel is None:
        t.copy_(values)
    elif isinstance(sel, slice):
        t.view(-1)[sel].copy_(values)
    else:
        t.view(-1)[sel] = values.to(t.dtype)


def flat_like(tensors: list[torch.Tensor], dtype=torch.float32, copy: bool = False) -> list[torch.Tensor]:
    """Tensors of `dtype` shaped like `tensors` (their local shards), over one contiguous buffer per device.
    One allocation per block instead of one per tensor: a switch frees it whole (nothing left behind for
    the allocator to fragment), and its size is exactly the block's (local) elements x the dtype's bytes.
    `copy` fills each with its tensor's values."""
    locals_ = [local_shard(t.detach()) for t in tensors]
    out: list[torch.Tensor | None] = [None] * len(locals_)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(locals_):
        by_device.setdefault(t.device, []).append(i)
    with torch.no_grad():
        for device, idx in by_device.items():
            storage = torch.empty(sum(locals_[i].numel() for i in idx), dtype=dtype, device=device).untyped_storage()
            offset = 0
            for i in idx:
                n = locals_[i].numel()
                # Tensors over the shared storage, not views of a base tensor: a view's `_base` would keep the
                # whole buffer alive for as long as any one of them exists.
                out[i] = torch.empty(0, dtype=dtype, device=device).set_(storage, offset, locals_[i].shape)
                if copy:
                    out[i].copy_(locals_[i])
                offset += n
    return out
