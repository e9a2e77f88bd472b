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


def needs_master(param: torch.Tensor) -> bool:
    # A sharded tensor always gets a plain local master: the inner optimizer's state then stays per-rank plain
    # tensors, whatever the weights' dtype (for fp32 weights that costs 4 bytes per local active element).
    return param.dtype != torch.float32 or is_sharded(param)


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


def make_flat_masters(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 masters of `params` (see `flat_like`)."""
    return flat_like(params, copy=True)


@torch.no_grad()
def grads_to_masters(params: list[torch.Tensor], masters: list[torch.Tensor], buffers: list[torch.Tensor],
                     selections: list[Selection | None] | None = None) -> None:
    """Move each low-precision grad that is still on its parameter up to its master (fp32) and free the
    low-precision one. A master whose gradient already arrived in fp32 (the post-accumulate-grad path) keeps
    it, adding what the parameter holds. `buffers[i]` is where master i's fp32 gradient lives (its part of
    the block's gradient buffer, see `flat_like`); `selections[i]` which entries master i mirrors."""
    selections = selections if selections is not None else [None] * len(params)
    for p, m, buf, sel in zip(params, masters, buffers, selections):
        if p.grad is None:
            continue
        g = selected(p.grad, sel)
        if m.grad is not None:
            m.grad.add_(g)
        else:
            m.grad = buf.copy_(g)
        p.grad = None


@torch.no_grad()
def masters_to_params(params: list[torch.Tensor], masters: list[torch.Tensor]) -> None:
    """Write the updated masters back into the model's weights (or local shards); drop the master grads."""
    for p, m in zip(params, masters):
        local_shard(p).copy_(m)
        m.grad = None


# --- fp32 masters held as bf16 weights + 16 low bits ---------------------------------------------------
# Between two steps a bf16 weight already holds the top 16 bits of its fp32 master; only the low 16 bits need
# keeping (2 bytes instead of 4). The weight is the master rounded to nearest, ties toward zero in magnitude
# (torch's `.to(bfloat16)` breaks ties to even; the two differ only when the low half is exactly 0x8000, and
# both are then exactly half an ulp away). With that rule the signed residual master - weight lies in
# (-0x8000, 0x8000] (in units of the master's last bit), 65536 values: one int16.


# Elements per pass: the one int32 temporary of a split stays at 4 MiB whatever the tensor's size.
SPLIT_CHUNK = 1 << 20


@torch.no_grad()
def split_master(master: torch.Tensor, weight: torch.Tensor, low: torch.Tensor) -> None:
    """Write the rounded master into `weight` (bf16) and its low 16 bits into `low` (int16), in place."""
    bits, hi, lo = master.reshape(-1).view(torch.int32), weight.reshape(-1).view(torch.int16), low.reshape(-1)
    for start in range(0, bits.numel(), SPLIT_CHUNK):
        b = bits[start:start + SPLIT_CHUNK]
        # + 0x7FFF carries into the top half exactly when the low half is above 0x8000: round to nearest, ties
        # toward zero (the bit pattern is sign-magnitude, so this holds for negative values too).
        t = b + 0x7FFF
        t.bitwise_right_shift_(16)
        hi[start:start + SPLIT_CHUNK].copy_(t)  # int32 -> int16 keeps the low 16 bits: the bf16 pattern
        t.bitwise_left_shift_(16).neg_().add_(b).sub_(1)  # the residual minus one, in [-0x8000, 0x7FFF]
        lo[start:start + SPLIT_CHUNK].copy_(t)


@torch.no_grad()
def join_master(weight: torch.Tensor, low: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The fp32 master that `split_master` split into `weight` and `low`, written into `out`."""
    bits = out.reshape(-1).view(torch.int32)
    bits.copy_(weight.reshape(-1).view(torch.int16))  # sign-extends the bf16 pattern
    bits.bitwise_left_shift_(16).add_(low.reshape(-1)).add_(1)
    return out


class MasterBuffer:
    """The fp32 masters of some parameters (a block, or the always-active ones). `split()` (after a step) writes
    the rounded masters into bf16 weights, keeps only their low 16 bits and frees the fp32 masters; `join()`
    (before the next step) rebuilds the masters bit for bit. The master tensors stay the same objects (the
    inner optimizer's state is keyed by them); while split they hold no elements, so a stale reference reads
    as empty instead of as freed memory.

    The masters start as views of one buffer per device (made from the weights at a block's first step).
    Split and join go tensor by tensor, largest first, each low half and each rebuilt master an allocation of
    its own: a join frees every low half as soon as its master is rebuilt, so an fp32 copy of the whole block
    never coexists with the block's low halves (at 70B: 3.42 GB of masters next to 1.71 GB of low halves).
    The most a join holds above the rebuilt masters is the low halves not yet consumed, at most those of the
    one largest tensor (its own master has to be whole before its low half can go)."""

    def __init__(self, names: list[str], params: list[torch.Tensor]):
        self.names, self.params = list(names), list(params)
        self.masters = make_flat_masters(self.params)
        self._shapes = [m.shape for m in self.masters]
        self._largest_first = sorted(range(len(self.masters)), key=lambda i: -self.masters[i].numel())
        self.lows: list[torch.Tensor] | None = None

    @property
    def can_split(self) -> bool:
        return all(p.dtype == torch.bfloat16 for p in self.params)

    @property
    def is_split(self) -> bool:
        return self.lows is not None

    def nbytes(self) -> int:
        if self.lows is not None:
            return sum(t.numel() * t.element_size() for t in self.lows)
        return sum(m.numel() * m.element_size() for m in self.masters)

    @torch.no_grad()
    def split(self) -> None:
        if self.is_split:
            return
        lows: list[torch.Tensor | None] = [None] * len(self.masters)
        for i in self._largest_first:
            m = self.masters[i]
            lows[i] = torch.empty(m.shape, dtype=torch.int16, device=m.device)
            split_master(m, local_shard(self.params[i].detach()), lows[i])
            # A master with a storage of its own (after a join) is freed here; views of the first buffer free
            # it with the last of them.
            m.data = torch.empty(0, dtype=torch.float32, device=m.device)
        self.lows = lows

    @torch.no_grad()
    def store(self) -> None:
        """Write the masters, rounded, into the weights (the whole-master path, at a block's end)."""
        masters_to_params(self.params, self.masters)

    @torch.no_grad()
    def join(self) -> None:
        if not self.is_split:
            return
        lows = self.lows
        for i in self._largest_first:
            master = torch.empty(self._shapes[i], dtype=torch.float32, device=lows[i].device)
            join_master(local_shard(self.params[i].detach()), lows[i], master)
            self.masters[i].data = master
            lows[i] = None  # this tensor's low half goes before the next master is allocated
        self.lows = None

    @torch.no_grad()
    def value(self, i: int) -> torch.Tensor:
        """Master i as a tensor with its values (a rebuilt copy while split, without joining the buffer)."""
        if not self.is_split:
            return self.masters[i]
        return join_master(local_shard(self.params[i].detach()), self.lows[i],
                           torch.empty(self._shapes[i], dtype=torch.float32, device=self.lows[i].device))
