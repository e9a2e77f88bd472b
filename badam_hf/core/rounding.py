"""Stochastic rounding of fp32 values into bf16 weights.

A value between two neighbouring bf16 numbers is rounded up (in magnitude) with probability equal to the
fraction of the gap it covers, so the rounded weight equals the fp32 value in expectation: an update smaller
than half a bf16 ulp survives on average instead of being lost. The bit trick: add 16 random bits to the low
half of the fp32 pattern and keep the top half (the pattern is sign-magnitude, so this rounds the magnitude,
and a carry moves to the next binade exactly as the next bf16 number).

The random bits are a pure function of a key and of each entry's position p in the whole flattened parameter
(counter-based, no generator state): ranks holding different shards of one tensor draw what a single process
would, any number of ranks gives the same weights, CPU and CUDA agree, and a resumed run draws what an
uninterrupted one did. Keys come from (seed, step, parameter index, stream) through `rounding_key`.

The noise of position p is F(p // ROW) xor G(p % ROW): two short tables (one entry per row of ROW positions,
one per column), hashed from the key and their index with a 32-bit integer hash (`noise16`). Over keys every
entry's noise is uniform on [0, 65536) (so the rounding is unbiased) and any two entries' noises are
independent (they differ in row or column, and a different row or column is an independent draw): the
rounding errors of any linear combination of weights have the mean and variance of independent draws. The
tables are hashed on the CPU (exact int64 arithmetic, a few thousand entries per tensor) and moved to the
tensor's device in one copy; the device then runs three exact integer kernels a pass (`_round`: the xor of
the tables, the add, the copy of the high halves; three more where the tensor holds a NaN, which one sum per
tensor tells), in passes sized per device (`chunk_elements`).
"""

from __future__ import annotations

import math
import sys

import torch

from .shards import Selection, local_shard, write_selected
from .schedule import period_seed


# Separate streams of keys, so that two uses at the same (step, parameter) never share their noise.
SWITCH_STREAM = 0x5357  # a block's masters written into the weights for the last time
INACTIVE_STREAM = 0x494E  # BREAD's inactive step of a frozen bf16 weight

# Entries per pass on the CPU: the temporaries (8 bytes an entry, 512 KiB) stay in the core's L2 cache, and a
# pass is long enough that the per-op overhead stops dominating. Measured on the idle bf16 machine, one 11.8M-entry
# layer (benchmarks/rounding_cost.py): 2^14 entries 34 ms on 2 threads / 28 ms on 1; 2^16 15.6 / 21.9 ms;
# 2^18 12.4 / 26.4 ms. (Below torch's parallel grain, 32768, every op runs on one thread, which helps only on
# a loaded machine.)
CHUNK = 1 << 16
# Entries per pass elsewhere (CUDA; meta stands in for it in the dry run): a pass is three kernel launches (six
# when the tensor holds a NaN), so an 8B layer's largest matrix (58.7M entries) takes one pass; the temporaries
# of a pass are at most 9 bytes an entry, 576 MiB, made after the step's gradients were freed.
DEVICE_CHUNK = 1 << 26

# Positions per noise row. Prime, so that the rows of the noise never line up with a weight matrix's rows.
ROW = 4099
_COLUMN_TAG = 1 << 40  # column indices are hashed as ROW + tag..: never equal to a row index

_M32 = 0xFFFFFFFF
_BF16_NAN = 0x7FC0  # what torch's conversion gives for any NaN

if sys.byteorder != "little":  # the high half of an int32 is read as the second int16 of its pair
    raise ImportError("badam_hf's stochastic rounding assumes a little-endian machine")


def rounding_key(seed: int, step: int, index: int, stream: int) -> int:
    """A 64-bit key for the noise of parameter `index` at optimizer step `step` (the count of steps done once
    this write lands), hashed so that neighbouring inputs give unrelated noise."""
    return period_seed(seed, step, (index << 16) ^ stream)


def chunk_elements(device: torch.device) -> int:
    """Entries per pass: cache-sized on the CPU, large where each kernel launch costs (CUDA)."""
    return CHUNK if torch.device(device).type == "cpu" else DEVICE_CHUNK


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
    """16 uniform random bits (int64 in [0, 65535]) for each index (int64, >= 0) under `key`: the hash the
    noise tables are made of."""
    k0, k1 = key & _M32, (key >> 32) & _M32
    h = _mix32((positions & _M32) ^ k0)
    h = _mix32(h.bitwise_xor_((positions >> 32) ^ k1))
    return h.bitwise_right_shift_(16)


def noise_at(key: int, positions: torch.Tensor) -> torch.Tensor:
    """The noise (int64 in [0, 65535]) of the entries at `positions` (int64, any device) under `key`: what
    every other path draws for them."""
    return noise16(key, positions // ROW).bitwise_xor_(noise16(key, positions % ROW + _COLUMN_TAG))


class _Noise:
    """The noise of positions [lo, lo + n) under `key`, on `device`: the tables of the rows they touch and of
    the columns, hashed on the CPU and moved in one copy, and the buffers a pass works in (made once per
    tensor and reused by every pass: on the CPU a fresh allocation per pass costs more than the pass)."""

    def __init__(self, key: int, lo: int, n: int, device, step: int):
        self.lo, self.row0 = lo, lo // ROW
        if n <= ROW:  # a short range (a norm's weight): its own noise, cheaper than a table of ROW columns
            host = noise_at(key, torch.arange(lo, lo + n, dtype=torch.int64)).to(torch.int32)
            self.direct = host.to(device, copy=True)  # a copy on the CPU too: the CPU and meta allocate alike
            del host
        else:
            self.direct = None
            rows = (lo + n - 1) // ROW - self.row0 + 1
            idx = torch.arange(ROW + rows, dtype=torch.int64)
            idx[:ROW] += _COLUMN_TAG
            idx[ROW:] += self.row0 - ROW
            host = noise16(key, idx).to(torch.int32)
            table = host.to(device, copy=True)
            del host
            self.columns, self.rows = table[:ROW], table[ROW:]
        m = min(step, n)
        if self.direct is None:
            self.noise = torch.empty(m + 2 * ROW, dtype=torch.int32, device=device)  # the whole rows of a pass
        self.bits = torch.empty(m, dtype=torch.int32, device=device)

    def chunk(self, lo: int, n: int) -> torch.Tensor:
        """int32 noise of positions [lo, lo + n): the xor of its rows' and the columns' tables, broadcast over
        the whole rows it touches (at most 2 x ROW entries more than n)."""
        if self.direct is not None:
            return self.direct[lo - self.lo:lo - self.lo + n]
        r0, r1 = lo // ROW - self.row0, (lo + n - 1) // ROW - self.row0 + 1
        full = self.noise[:(r1 - r0) * ROW].view(r1 - r0, ROW)
        torch.bitwise_xor(self.rows[r0:r1, None], self.columns[None, :], out=full)
        off = lo - (self.row0 + r0) * ROW
        return self.noise[off:off + n]

    def round_into(self, dst: torch.Tensor, x: torch.Tensor, lo: int, fix_nan: bool) -> None:
        """Write fp32 `x` (flat, at positions [lo, lo + len(x))) stochastically rounded into `dst` (int16
        bf16 patterns)."""
        n = x.numel()
        _round(x, self.chunk(lo, n), dst, self.bits[:n], fix_nan)


def _needs_nan_fix(flat: torch.Tensor, sync: bool = True) -> bool:
    """Whether the passes over `flat` must look for NaN. One sum of the tensor tells (NaN and inf propagate into
    it): one kernel and, off the CPU, one host sync, against a NaN mask in every pass (two kernels a pass; on
    the CPU as costly as the rest of the rounding). Worth its sync where it runs once per block visit (a
    block's last write-back); `sync=False` (a write every step) looks for NaN in every pass off the CPU instead.
    The dry run's meta tensors have no values: they take the NaN-free path, as a finite run does."""
    if flat.device.type != "cpu" and not sync:
        return True
    total = flat.sum()
    return total.device.type != "meta" and not math.isfinite(total.item())


def _round(x: torch.Tensor, noise: torch.Tensor, dst: torch.Tensor, t: torch.Tensor, fix_nan: bool) -> None:
    """dst (int16 bf16 patterns) = fp32 `x` with its magnitude rounded up when its low 16 bits + `noise`
    (int32 in [0, 65536)) carry; `t` is an int32 buffer of x's size. Exact integer operations only, so every
    device computes the same bits.

    The int32 sum never overflows (signed overflow is undefined in C++, so no result may depend on how a
    device wraps it): a finite or infinite pattern is at most 0x7F800000, a negative one is -2**31 + a
    magnitude and stays below zero, and with `fix_nan` (whenever `x` may hold a NaN) a clamp caps a positive
    NaN's pattern at 0x7FC00000 first. A NaN may come out as inf or another pattern there; `fix_nan` then
    writes torch's NaN (0x7FC0) over every NaN's result."""
    if fix_nan:
        torch.clamp(x.view(torch.int32), max=0x7FC00000, out=t).add_(noise)
    else:  # no NaN here (the caller checked): the clamp would change nothing
        torch.add(x.view(torch.int32), noise, out=t)
    if t.device.type == "cpu":
        dst.copy_(t.bitwise_right_shift_(16))  # on the CPU a shift and a plain copy beat a strided copy
    else:
        dst.copy_(t.view(torch.int16)[1::2])  # the high half of each int32 (little-endian), one kernel
    if fix_nan:
        dst.masked_fill_(torch.isnan(x), _BF16_NAN)


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
    n = flat.numel()
    if n == 0:
        return out
    step = chunk_elements(flat.device)
    fix_nan = _needs_nan_fix(flat)
    if isinstance(where, int):
        noise = _Noise(key, where, n, flat.device, step)
        for s in range(0, n, step):
            x = flat[s:s + step]
            noise.round_into(dst[s:s + x.numel()], x, where + s, fix_nan)
        return out
    for s in range(0, n, step):  # a scattered selection: every entry hashes its own row and column
        x = flat[s:s + step]
        pos = where[s:s + x.numel()].to(device=x.device, dtype=torch.int64)
        _round(x, noise_at(key, pos).to(torch.int32), dst[s:s + x.numel()], torch.empty_like(x, dtype=torch.int32),
               fix_nan)
    return out


@torch.no_grad()
def stochastic_add_(weight: torch.Tensor, update: torch.Tensor, alpha: float, key: int, start: int = 0) -> None:
    """weight += alpha x update, computed in fp32 and rounded stochastically into the bf16 `weight` (flat
    position of its first entry: `start`), chunk by chunk."""
    w, u = weight.view(-1), update.reshape(-1)
    if w.numel() == 0:
        return
    step = chunk_elements(w.device)
    noise = _Noise(key, start, w.numel(), w.device, step)
    for s in range(0, w.numel(), step):
        x = w[s:s + step].float().add_(u[s:s + step].float(), alpha=alpha)
        noise.round_into(w[s:s + step].view(torch.int16), x, start + s, _needs_nan_fix(x, sync=False))


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
