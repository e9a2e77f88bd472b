"""LiveTensorBytes: the allocator-independent count of live tensor bytes behind the bench's phase table."""

from __future__ import annotations

import torch

from badam_hf.tools.live_memory import LiveTensorBytes, format_snapshot, storage_key


def test_counts_storages_once_frees_them_and_keeps_phase_peaks():
    w = torch.ones(256)  # made before: registered
    live = LiveTensorBytes()
    live.track([w, w.view(16, 16)], "weights")  # a view of a counted storage is not counted twice
    assert live.live_bytes() == 1024
    with live:
        with live.phase("a"):
            x = torch.empty(1000, dtype=torch.float32)
            y = x.view(10, 100)  # a view: no new bytes
            z = x * 2  # 4000 new bytes
            assert live.live_bytes() == 1024 + 4000 + 4000
            del x, y, z
        with live.phase("b"):
            t = torch.zeros(100, dtype=torch.bfloat16)
            assert live.live_bytes() == 1024 + 200
    assert live.peaks["a"] == 1024 + 8000 and live.peaks["b"] == 1024 + 200
    assert live.peak == 1024 + 8000 and live.peak_phase == "a"
    del t
    assert live.live_bytes() == 1024
    rows = format_snapshot(live.peak_snapshot)
    assert ("a", "mul.Tensor", 4000) in rows and ("setup", "weights", 1024) in rows


def test_labeler_names_known_tensors_at_the_peak():
    keep = torch.ones(500)
    live = LiveTensorBytes(labeler=lambda: {storage_key(keep): "moments"})
    live.track([keep], "state")
    with live, live.phase("step"):
        tmp = keep + 1
        del tmp
    assert dict(((p, w), b) for p, w, b in format_snapshot(live.peak_snapshot))[("setup", "moments")] == 2000


def test_counts_meta_tensors_by_storage_identity():
    """data_ptr() is 0 for every meta storage; the count keys on the storage itself, so meta works like CPU."""
    w = torch.empty(256, device="meta")
    live = LiveTensorBytes()
    live.track([w], "weights")
    with live, live.phase("a"):
        x = torch.empty(1000, device="meta")
        y = x * 2
        assert live.live_bytes() == 1024 + 8000
        del x, y
        z = torch.empty(10, device="meta", dtype=torch.bfloat16)
        assert live.live_bytes() == 1024 + 20
    assert live.peak == 1024 + 8000
    del z
    assert live.live_bytes() == 1024
