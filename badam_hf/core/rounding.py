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
rounding errors of any linear combination of weights have the mean and variance of independent draws.

The cost is what a nearest write-back pays plus a few operations on data in cache. The tables of all the
tensors written together (a block's) are hashed on the host in one numpy call (a few thousand entries per
tensor) and moved to the device in one copy. Each pass then runs exact integer kernels over entries the
cache holds: the xor of the tables, the add, and the high halves' copy (on the CPU a shift and a narrowing
copy), after a sum of the pass (on the CPU; elsewhere one per tensor, read back once) that tells whether
NaN needs two more. Passes are sized per device (`chunk_elements`).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from .shards import Selection, local_shard, write_selected
from .schedule import period_seed


# Separate streams of keys, so that two uses at the same (step, parameter) never share their noise.
SWITCH_STREAM = 0x5357  # a block's masters written into the weights for the last time
INACTIVE_STREAM = 0x494E  # BREAD's inactive step of a frozen bf16 weight

# Entries per pass on the CPU: the pass's data (10 bytes an entry: the fp32 values, the int32 noise/sum, the
# bf16 result) stays in the cache, and a pass is long enough that the per-op overhead stops dominating.
# Measured on an idle 2-vCPU AMD EPYC (avx512_bf16), one 11.8M-entry layer, caches evicted, best / median of 25
# (`python benchmarks/rounding_cost.py --chunks 16,18,19,20,21`; nearest 2.2 / 2.3 ms): 2^16 entries 11.5 /
# 12.0 ms on 2 threads, 12.4 / 12.7 on 1; 2^18 7.1 / 7.9 and 8.8 / 9.0; 2^19 6.4 / 6.6 and 8.2 / 8.4; 2^20
# 6.7 / 8.2 and 8.3 / 8.8; 2^21 7.0 / 7.7 and 9.5 / 9.9.
CHUNK = 1 << 19
# Entries per pass elsewhere (CUDA; meta stands in for it in the dry run): a pass is three kernel launches (five
# when the tensor holds a NaN), so an 8B layer's largest matrix (58.7M entries) takes one pass; a pass's
# temporaries are 4 bytes an entry (9 with NaN), made after the step's gradients were freed.
DEVICE_CHUNK = 1 << 26

# Positions per noise row. Prime, so that the rows of the noise never line up with a weight matrix's rows.
ROW = 4099
_COLUMN_TAG = 1 << 40  # column c is hashed as the index c + tag: never equal to a row's index

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
    """16 uniform random bits (int64 in [0, 65535]) for each index (int64, >= 0, any device) under `key`: the
    hash the noise tables are made of (`_host_tables` computes the same on the host)."""
    k0, k1 = key & _M32, (key >> 32) & _M32
    h = _mix32((positions & _M32) ^ k0)
    h = _mix32(h.bitwise_xor_((positions >> 32) ^ k1))
    return h.bitwise_right_shift_(16)


def noise_at(key: int, positions: torch.Tensor) -> torch.Tensor:
    """The noise (int64 in [0, 65535]) of the entries at `positions` (int64, any device) under `key`: what
    every other path draws for them."""
    return noise16(key, positions // ROW).bitwise_xor_(noise16(key, positions % ROW + _COLUMN_TAG))


def _mix32_np(x: np.ndarray) -> np.ndarray:
    """`_mix32` in place over a uint32 array (numpy's unsigned arithmetic wraps modulo 2**32, by definition)."""
    x ^= x >> 16
    x *= np.uint32(0x7FEB352D)
    x ^= x >> 15
    x *= np.uint32(0x846CA68B)
    x ^= x >> 16
    return x


def _host_tables(requests: list[tuple[int, int, int]]) -> tuple[np.ndarray, list[int]]:
    """The noise tables of each (key, lo, n), hashed together on the host (int32): for each request the ROW
    columns' `noise16`, then the rows' that positions [lo, lo + n) touch. Equal to `noise16` entry by entry
    (tests/test_rounding_noise.py), in numpy's wrapping uint32 arithmetic: a dozen vector operations for all of
    a block's tensors, and host memory that no torch dispatch mode (the dry run's counter) takes for device
    memory."""
    low, high, k0, sizes = [], [], [], []  # per index: its low 32 bits; its high 32 bits xor the key's
    for key, lo, n in requests:
        rows = np.arange(lo // ROW, (lo + n - 1) // ROW + 1, dtype=np.uint64)
        k1 = (key >> 32) & _M32
        low += [np.arange(ROW, dtype=np.uint32), (rows & _M32).astype(np.uint32)]
        high += [np.full(ROW, (_COLUMN_TAG >> 32) ^ k1, dtype=np.uint32),
                 (rows >> 32).astype(np.uint32) ^ np.uint32(k1)]
        sizes.append(ROW + len(rows))
        k0.append(key & _M32)
    h = np.concatenate(low) ^ np.repeat(np.array(k0, dtype=np.uint32), sizes)
    h = _mix32_np(h)
    h ^= np.concatenate(high)
    return (_mix32_np(h) >> 16).astype(np.int32), sizes


class _Noise:
    """The noise of positions [lo, lo + n) from its tables (int32, on the tensor's device), made pass by pass
    in `buf`, a buffer the tensors of one write share (on the CPU a fresh allocation per pass costs more
    than the pass)."""

    def __init__(self, lo: int, n: int, table: torch.Tensor, buf: torch.Tensor, step: int):
        self.lo, self.n, self.row0, self.buf = lo, n, lo // ROW, buf
        self.columns, self.rows = table[None, :ROW], table[ROW:]
        # Passes end on multiples of `grain` (global positions): whole rows where a pass holds several.
        self.grain = step // ROW * ROW if step >= ROW else step

    @staticmethod
    def buffer_entries(lo: int, n: int, step: int) -> int:
        """The int32 entries a pass of `_Noise(lo, n, ..., step)` needs: the whole rows it touches."""
        rows = (lo + n - 1) // ROW - lo // ROW + 1
        return min(rows, max(step // ROW, 2)) * ROW

    def passes(self):
        """Yield (start, end, noise) per pass: offsets [start, end) into the tensor and the int32 noise of those
        entries (a view of `buf`, overwritten by the next pass)."""
        a, end = self.lo, self.lo + self.n
        while a < end:
            b = min(end, (a // self.grain + 1) * self.grain)
            r0, r1 = a // ROW - self.row0, (b - 1) // ROW - self.row0 + 1
            full = self.buf[:(r1 - r0) * ROW]
            torch.bitwise_xor(self.rows[r0:r1, None], self.columns, out=full.view(r1 - r0, ROW))
            off = a - (self.row0 + r0) * ROW
            yield a - self.lo, b - self.lo, full[off:off + b - a]
            a = b


def _noises(requests: list[tuple[int, int, int]], device) -> list[_Noise]:
    """The `_Noise` of each (key, lo, n) on `device`: the tables hashed on the host in one call and moved in
    one copy, and one pass buffer for all of them."""
    step = chunk_elements(device)
    host, sizes = _host_tables(requests)
    tables = torch.from_numpy(host).to(device, copy=True).split(sizes)  # a copy on the CPU too: alike on meta
    buf = torch.empty(max(_Noise.buffer_entries(lo, n, step) for _, lo, n in requests), dtype=torch.int32,
                      device=device)
    return [_Noise(lo, n, t, buf, step) for (_, lo, n), t in zip(requests, tables)]


class _NanCheck:
    """Whether the passes over each tensor must look for NaN: a sum tells (NaN and inf propagate into it),
    against a NaN mask in every pass (two kernels a pass; on the CPU as costly as the rest of the rounding).
    Off the CPU one sum per tensor, all read back in one host sync before the passes; on the CPU, where a read
    costs no sync, one sum per pass, which brings the pass's entries into the cache the pass then works in.
    Both write into one small buffer, so every device allocates alike. The dry run's meta tensors have no
    values: they take the NaN-free path, as a finite run does."""

    def __init__(self, flats: list[torch.Tensor], device):
        self.per_pass = device.type == "cpu"
        self.sums = torch.empty(len(flats), dtype=torch.float32, device=device)
        self.flags = [False] * len(flats)
        if not self.per_pass:
            for x, out in zip(flats, self.sums):
                torch.sum(x, 0, out=out)
            if device.type != "meta":
                self.flags = [not math.isfinite(v) for v in self.sums.tolist()]

    def __call__(self, i: int, x: torch.Tensor) -> bool:
        """Whether pass `x` of tensor `i` may hold a NaN."""
        if not self.per_pass:
            return self.flags[i]
        return not math.isfinite(torch.sum(x, 0, out=self.sums[i]).item())


def _round(x: torch.Tensor, t: torch.Tensor, dst: torch.Tensor, fix_nan: bool) -> None:
    """dst (int16 bf16 patterns) = fp32 `x` with its magnitude rounded up when its low 16 bits + the noise
    carry; `t` holds the noise (int32 in [0, 65536)) and is overwritten. Exact integer operations only, so
    every device computes the same bits.

    The int32 sum never overflows (signed overflow is undefined in C++, so no result may depend on how a
    device wraps it): a finite or infinite pattern is at most 0x7F800000, a negative one is -2**31 + a
    magnitude and stays below zero, and with `fix_nan` (whenever `x` may hold a NaN) a clamp caps a positive
    NaN's pattern at 0x7FC00000 first. A NaN may come out as inf or another pattern there; `fix_nan` then
    writes torch's NaN (0x7FC0) over every NaN's result."""
    bits = x.view(torch.int32)
    t.add_(torch.clamp(bits, max=0x7FC00000) if fix_nan else bits)
    if t.device.type == "cpu":
        dst.copy_(t.bitwise_right_shift_(16))  # on the CPU a shift and a plain copy beat a strided copy
    else:
        dst.copy_(t.view(torch.int16)[1::2])  # the high half of each int32 (little-endian), one kernel
    if fix_nan:
        dst.masked_fill_(torch.isnan(x), _BF16_NAN)


def _round_contiguous(work: list[tuple[torch.Tensor, torch.Tensor, int, int]]) -> None:
    """Each (flat fp32 values, flat int16 destination, key, global position of the first entry) rounded: per
    device one host read (the NaN sums), one table copy and one pass buffer."""
    by_device: dict[torch.device, list] = {}
    for item in work:
        if item[0].numel():
            by_device.setdefault(item[0].device, []).append(item)
    for device, items in by_device.items():
        may_hold_nan = _NanCheck([x for x, _, _, _ in items], device)
        noises = _noises([(key, lo, x.numel()) for x, _, key, lo in items], device)
        for i, ((x, dst, _, _), noise) in enumerate(zip(items, noises)):
            for s, e, t in noise.passes():
                xs = x[s:e]
                _round(xs, t, dst[s:e], may_hold_nan(i, xs))
        del noises, may_hold_nan


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
    if isinstance(where, int):
        _round_contiguous([(flat, dst, key, where)])
        return out
    if flat.numel() == 0:
        return out
    step = chunk_elements(flat.device)
    may_hold_nan = _NanCheck([flat], flat.device)
    for s in range(0, flat.numel(), step):  # a scattered selection: every entry hashes its own row and column
        x = flat[s:s + step]
        pos = where[s:s + x.numel()].to(device=x.device, dtype=torch.int64)
        _round(x, noise_at(key, pos).to(torch.int32), dst[s:s + x.numel()], may_hold_nan(0, x))
    return out


@torch.no_grad()
def stochastic_add_(weight: torch.Tensor, update: torch.Tensor, alpha: float, key: int, start: int = 0) -> None:
    """weight += alpha x update, computed in fp32 and rounded stochastically into the bf16 `weight` (flat
    position of its first entry: `start`), pass by pass. Off the CPU every pass looks for NaN (a write every
    step: no host sync); on the CPU one sum of the pass tells."""
    w, u = weight.view(-1), update.reshape(-1)
    if w.numel() == 0:
        return
    (noise,) = _noises([(key, start, w.numel())], w.device)
    for s, e, t in noise.passes():
        x = w[s:e].float().add_(u[s:e].float(), alpha=alpha)
        fix_nan = w.device.type != "cpu" or not math.isfinite(x.sum())
        _round(x, t, w[s:e].view(torch.int16), fix_nan)


def global_start(param: torch.Tensor) -> int:
    """The flat position of this rank's shard within the whole parameter (0 for a plain tensor)."""
    from .selection import local_range

    return local_range(param)[0]


@torch.no_grad()
def store_stochastic(param: torch.Tensor, master: torch.Tensor, sel: Selection | None, key: int) -> None:
    """Write the fp32 `master` of `param`'s selected entries (all of them for `sel=None`; its local shard)
    into `param`, rounded stochastically when `param` is bf16 (plainly copied otherwise)."""
    store_stochastic_many([(param, master, sel, key)])


@torch.no_grad()
def store_stochastic_many(items: list[tuple[torch.Tensor, torch.Tensor, Selection | None, int]]) -> None:
    """`store_stochastic` of each (param, master, selection, key); the contiguous ones (no selection or a slice)
    share one NaN read-back, one table copy and one pass buffer."""
    contiguous = []
    for param, master, sel, key in items:
        p = param.detach()
        local = local_shard(p)
        if local.dtype != torch.bfloat16:
            write_selected(p, sel, master)
            continue
        start, flat = global_start(p), local.view(-1)
        if isinstance(sel, torch.Tensor):
            write_selected(p, sel, stochastic_round(master, key, sel.to(torch.int64) + start))
        elif sel is None:
            contiguous.append((master.detach().reshape(-1), flat.view(torch.int16), key, start))
        else:
            contiguous.append((master.detach().reshape(-1), flat[sel].view(torch.int16), key, start + sel.start))
    _round_contiguous(contiguous)
