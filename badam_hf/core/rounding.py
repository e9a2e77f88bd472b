"""Stochastic rounding of fp32 values into bf16 weights.

A value between two neighbouring bf16 numbers is rounded up (in magnitude) with probability equal to the
fraction of the gap it covers, so the rounded weight equals the fp32 value in expectation: an update smaller
than half a bf16 ulp survives on average instead of being lost. The bit trick: add 16 random bits to the low
half of the fp32 pattern and keep the top half (the pattern is sign-magnitude, so this rounds the magnitude,
and a carry moves to the next binade exactly as the next bf16 number).

The random bits are a pure function of a key and of each entry's position in the whole flattened parameter
(a counter-based hash, no generator state): ranks holding different shards of one tensor draw what a single
process would, any number of ranks gives the same weights, CPU and CUDA agree, and a resumed run draws what an
uninterrupted one did. Keys come from (seed, step, parameter index, stream) through `rounding_key`.
Work runs in chunks: the temporaries stay a few MiB whatever the tensor's size.
"""

from __future__ import annotations

import torch

from .shards import Selection, local_shard, write_selected
from .schedule import period_seed


# Separate streams of keys, so that two uses at the same (step, parameter) never share their noise.
SWITCH_STREAM = 0x5357  # a block's masters written into the weights for the last time
INACTIVE_STREAM = 0x494E  # BREAD's in-backward update of a frozen bf16 weight

# Entries per pass: a handful of int64 temporaries of this size (8 MiB each).
CHUNK = 1 << 20

_M32 = 0xFFFFFFFF
_BF16_NAN = 0x7FC0  # what torch's conversion gives for any NaN


def rounding_key(seed: int, step: int, index: int, stream: int) -> int:
    """A 64-bit key for the noise of parameter `index` at optimizer step `step` (the count of steps done once
    this write lands), hashed so that neighbouring inputs give unrelated noise."""
    return period_seed(seed, step, (index << 16) ^ stream)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 `x` in [0, 2**32): split `c` in 16-bit halves so no product overflows int64."""
    lo, hi = c & 0xFFFF, c >> 16
    t = x * hi
    t.bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return t.add_(x * lo).bitwise_and_(_M32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply rounds) over int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x.bitwise_xor_(x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x.bitwise_xor_(x >> 16)


def noise16(key: int, positions: torch.Tensor) -> torch.Tensor:
    """16 uniform random bits (int64 in [0, 65535]) for each position (int64, >= 0) under `key`."""
    k0, k1 = key & _M32, (key >> 32) & _M32
    h = _mix32((positions & _M32) ^ k0)
    h = _mix32(h.bitwise_xor_((positions >> 32) ^ k1))
    return h.bitwise_right_shift_(16)


def _positions(where: int | torch.Tensor, start: int, n: int, device) -> torch.Tensor:
    if isinstance(where, int):
        return torch.arange(where + start, where + start + n, dtype=torch.int64, device=device)
    return where[start:start + n].to(device=device, dtype=torch.int64)


@torch.no_grad()
def round_chunk(x: torch.Tensor, key: int, positions: torch.Tensor) -> torch.Tensor:
    """The bf16 bit patterns (int64) of fp32 `x` (flat) stochastically rounded, one draw per position."""
    bits = x.view(torch.int32).to(torch.int64)  # sign-extended: a negative value keeps its magnitude bits
    t = bits.add_(noise16(key, positions)).bitwise_right_shift_(16)  # finite: the magnitude never reaches 2**31
    # inf has zero low bits and stays inf; a NaN's low bits could carry it to inf: give torch's NaN instead.
    return torch.where(torch.isnan(x), torch.full_like(t, _BF16_NAN), t)


@torch.no_grad()
def stochastic_round(src: torch.Tensor, key: int, where: int | torch.Tensor = 0,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """`src` (fp32) rounded stochastically to bf16, into `out` (bf16, contiguous, as many entries) or a new tensor.

    `where` places `src` in its whole parameter: the flat position of its first entry (the rest follow), or
    an int64 tensor with each entry's flat position (a scattered selection). Entries at equal positions under
    equal keys round alike, wherever and however the tensor is split."""
    flat = src.detach().reshape(-1)
    if flat.dtype != torch.float32:
        raise TypeError(f"stochastic_round takes float32 values, got {flat.dtype}")
    if out is None:
        out = torch.empty(src.shape, dtype=torch.bfloat16, device=src.device)
    dst = out.view(-1).view(torch.int16)
    for start in range(0, flat.numel(), CHUNK):
        x = flat[start:start + CHUNK]
        dst[start:start + x.numel()].copy_(round_chunk(x, key, _positions(where, start, x.numel(), x.device)))
    return out


@torch.no_grad()
def stochastic_add_(weight: torch.Tensor, update: torch.Tensor, alpha: float, key: int, start: int = 0) -> None:
    """weight += alpha x update, computed in fp32 and rounded stochastically into the bf16 `weight` (flat
    position of its first entry: `start`), chunk by chunk."""
    w, u = weight.view(-1), update.reshape(-1)
    for s in range(0, w.numel(), CHUNK):
        x = w[s:s + CHUNK].float().add_(u[s:s + CHUNK].float(), alpha=alpha)
        w[s:s + CHUNK].view(torch.int16).copy_(round_chunk(x, key, _positions(start, s, x.numel(), x.device)))


def global_start(param: torch.Tensor) -> int:
    """The flat position of this rank's shard within the whole parameter (0 for a plain tensor)."""
    from .selection import local_range

    return local_range(param)[0]


@torch.no_grad()
def store_stochastic(param: torch.Tensor, master: torch.Tensor, sel: Selection | None, key: int) -> None:
    """Write the fp32 `master` of `param`'s selected entries (all of them for `sel=None`; its local shard)
    into `param`, rounded stochastically when `param` is bf16 (plainly copied otherwise)."""
    p = param.detach()
    local = local_shard(p)
    if local.dtype != torch.bfloat16:
        write_selected(p, sel, master)
        return
    start = global_start(p)
    flat = local.view(-1)
    if sel is None:
        stochastic_round(master, key, start, out=flat)
    elif isinstance(sel, slice):
        stochastic_round(master, key, start + sel.start, out=flat[sel])
    else:
        write_selected(p, sel, stochastic_round(master, key, sel.to(torch.int64) + start))
