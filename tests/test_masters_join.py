"""Rebuilding split masters (`MasterBuffer.join`) holds no fp32 copy of the whole block next to its low halves."""

from __future__ import annotations

import torch

from badam_hf.core.masters import MasterBuffer
from badam_hf.core.rounding import CHUNK
from badam_hf.tools.live_memory import LiveTensorBytes

# A Llama layer's matrices in 70B's proportions (q, k, v, o, gate, up, down), scaled down: hidden 64.
SHAPES = [(64, 64), (8, 64), (8, 64), (64, 64), (224, 64), (224, 64), (64, 224)]


def _block(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(torch.bfloat16)) for s in SHAPES]
    buf = MasterBuffer([f"p{i}" for i in range(len(params))], params)
    with torch.no_grad():  # masters that differ from their weights below bf16's precision, as after a few steps
        for m in buf.masters:
            m.add_(torch.randn(m.shape, generator=g) * 1e-3)
    return params, buf


def test_join_rebuilds_the_same_masters_bit_for_bit():
    params, buf = _block()
    before = [m.clone() for m in buf.masters]
    objects = [id(m) for m in buf.masters]
    for _ in range(3):  # split/join cycles: the first from the one buffer, the later ones from per-tensor masters
        buf.split()
        assert all(m.numel() == 0 for m in buf.masters)
        assert buf.nbytes() == 2 * sum(p.numel() for p in params)
        buf.join()
        assert [id(m) for m in buf.masters] == objects  # the inner optimizer's state stays keyed by them
        for m, b in zip(buf.masters, before):
            assert torch.equal(m.view(torch.int32), b.view(torch.int32))


def _join_peak(buf, params) -> int:
    """The most bytes alive during the join, the bf16 weights left out."""
    live = LiveTensorBytes()
    live.track(params, "weights")
    live.track(buf.lows, "low halves")
    with live:
        with live.phase("join"):
            buf.join()
    return live.peaks["join"] - 2 * sum(p.numel() for p in params)


def test_join_peak_stays_below_masters_plus_low_halves():
    params, buf = _block()
    numel = sum(p.numel() for p in params)
    fp32_block, low_halves = 4 * numel, 2 * numel
    largest_low = 2 * max(p.numel() for p in params)
    for cycle in range(2):
        buf.split()
        peak = _join_peak(buf, params)
        # Before: the whole block's fp32 buffer was allocated while every low half was alive.
        assert peak < fp32_block + low_halves, (cycle, peak)
        # Now at most the low halves of one tensor (the largest) are alive next to the rebuilt masters.
        assert fp32_block <= peak <= fp32_block + largest_low, (cycle, peak)


def test_split_frees_each_rebuilt_master_as_it_goes():
    params, buf = _block()
    numel = sum(p.numel() for p in params)
    buf.split()
    buf.join()  # masters now have storages of their own
    live = LiveTensorBytes()
    live.track(params, "weights")
    live.track(buf.masters, "masters")
    with live:
        with live.phase("split"):
            buf.split()
    weights, largest = 2 * numel, max(p.numel() for p in params)
    # Masters, one tensor's low half, and split_master's int32 temporary (at most CHUNK elements: one pass).
    assert live.peaks["split"] - weights <= 4 * numel + 2 * largest + 4 * min(largest, CHUNK)
    assert live.live_bytes() - weights == 2 * numel  # only the low halves are left
