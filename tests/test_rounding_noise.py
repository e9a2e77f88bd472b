"""The noise of the stochastic rounding (core/rounding.py): a pure function of (key, global position), whatever
the chunk size, shard layout or device path; unbiased over keys; any two positions independent. And the
kernel-count report of one optimizer step (tools/kernel_count.py): counts, not timings."""

from __future__ import annotations

import pytest
import torch

import badam_hf.core.rounding as rounding
from badam_hf.core.rounding import ROW, SWITCH_STREAM, noise_at, rounding_key, stochastic_add_, stochastic_round


def patterns(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(-1).view(torch.int16)


def draws(n: int, key: int, lo: int = 0) -> torch.Tensor:
    """The noise of positions [lo, lo + n) under `key`."""
    return noise_at(key, torch.arange(lo, lo + n, dtype=torch.int64))


def test_noise_is_16_bits_and_a_pure_function_of_key_and_position():
    key = rounding_key(3, 7, 2, SWITCH_STREAM)
    pos = torch.tensor([0, 1, ROW - 1, ROW, 5 * ROW + 17, 2 ** 31 + 5, 2 ** 32 + 3, 2 ** 40 + 9])
    a = noise_at(key, pos)
    assert a.min() >= 0 and a.max() < 65536
    assert torch.equal(a, noise_at(key, pos))
    assert torch.equal(a[3:5], noise_at(key, pos[3:5]))  # each entry alone
    assert not torch.equal(a, noise_at(rounding_key(3, 8, 2, SWITCH_STREAM), pos))


def _threshold_values(noise_len: int, lo: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 values 1 + f * 2**-7 (f = their low half / 65536): rounding up happens exactly when low + noise
    carries, so the result reveals whether noise >= 65536 - low."""
    low = torch.randint(0, 65536, (noise_len,), generator=torch.Generator().manual_seed(lo))
    bits = torch.full((noise_len,), 0x3F800000, dtype=torch.int64) + low
    return bits.to(torch.int32).view(torch.float32), low


@pytest.mark.parametrize("chunk", [333, ROW - 1, ROW, ROW + 1, 1 << 14])
@pytest.mark.parametrize("lo", [0, 5, ROW - 3, 3 * ROW + 1000])
def test_chunk_size_and_offset_do_not_change_a_single_draw(monkeypatch, chunk, lo):
    """The result for a tensor equals, entry by entry, the rounding with noise_at of the entry's global
    position, whatever the CPU chunk size and wherever the tensor starts (a shard, a slice selection)."""
    key = rounding_key(11, 4, 9, SWITCH_STREAM)
    n = 3 * ROW + 77
    x, low = _threshold_values(n, lo, key)
    expected_up = (low + draws(n, key, lo)) >= 65536
    monkeypatch.setattr(rounding, "CHUNK", chunk)
    r = stochastic_round(x, key, lo)
    up = patterns(r).to(torch.int64) != 0x3F80
    assert torch.equal(up, expected_up)
    # Shards of any size at their global offsets draw the whole tensor's slice.
    cuts = [0, 1, ROW, ROW + 2, 2 * ROW + 5, n]
    parts = [stochastic_round(x[a:b], key, lo + a) for a, b in zip(cuts[:-1], cuts[1:])]
    assert torch.equal(torch.cat(parts), r)
    # A scattered selection (positions as a tensor) draws the same.
    idx = torch.tensor([0, 7, ROW, n - 1, 2 * ROW + 3])
    assert torch.equal(stochastic_round(x[idx], key, idx + lo), r[idx])


def test_stochastic_add_uses_the_same_noise():
    key = rounding_key(1, 2, 3, SWITCH_STREAM)
    w = (torch.randn(3 * ROW + 5) * 0.02).to(torch.bfloat16)
    u = torch.randn(w.numel()).to(torch.bfloat16)
    out = w.clone()
    stochastic_add_(out, u, -1e-5, key, start=12)
    assert torch.equal(out, stochastic_round(w.float().add(u.float(), alpha=-1e-5), key, 12))


def test_noise_is_uniform_and_pairwise_independent_over_keys():
    """Over many keys each position's noise is uniform on 16 bits (so the rounding is unbiased), and for pairs
    of positions in the same row, the same column and neither, the two noises are uncorrelated."""
    keys = [rounding_key(0, s, 1, SWITCH_STREAM) for s in range(3000)]
    pos = torch.tensor([5, 6, 5 + ROW, 9 * ROW + 100, 2 ** 33 + 1])
    d = torch.stack([noise_at(k, pos) for k in keys]).double()  # keys x positions
    u = (d + 0.5) / 65536
    mean_se = (1 / 12 / len(keys)) ** 0.5
    assert bool(((u.mean(0) - 0.5).abs() < 5 * mean_se).all()), u.mean(0)
    # quarters equally often
    q = torch.stack([((u >= a / 4) & (u < (a + 1) / 4)).double().mean(0) for a in range(4)])
    assert bool(((q - 0.25).abs() < 5 * (0.25 * 0.75 / len(keys)) ** 0.5).all()), q
    c = torch.corrcoef(u.T)
    off = c[~torch.eye(len(pos), dtype=torch.bool)]
    assert bool((off.abs() < 5 / len(keys) ** 0.5).all()), c
    # the low bit and the top bit of one position are not tied to each other's or a neighbour's
    bits = torch.stack([(d.long() >> b) & 1 for b in (0, 15)], 1).double().reshape(len(keys), -1)
    cb = torch.corrcoef(bits.T)
    assert bool((cb[~torch.eye(cb.shape[0], dtype=torch.bool)].abs() < 5 / len(keys) ** 0.5).all())


def test_the_mean_of_many_keys_is_the_fp32_value():
    """One tensor rounded under many keys: the mean of the bf16 results is the fp32 value (within 5 standard
    errors) entry by entry, for entries spread over rows and columns."""
    x = torch.randn(2 * ROW + 10) * 0.02
    keys = [rounding_key(5, s, 0, SWITCH_STREAM) for s in range(400)]
    acc = torch.zeros(x.numel(), dtype=torch.float64)
    for k in keys:
        acc += stochastic_round(x, k).double()
    mean = acc / len(keys)
    bits = x.view(torch.int32)
    lo = (bits >> 16 << 16).view(torch.float32).double()
    hi = ((bits >> 16) + 1 << 16).view(torch.float32).double()
    p = (x.double() - lo) / (hi - lo)
    se = (hi - lo).abs() * (p * (1 - p) / len(keys)).sqrt()
    assert bool(((mean - x.double()).abs() <= 5 * se + 1e-12).all())


def test_nan_inf_and_overflowing_patterns_stay_in_range():
    """NaN patterns of every payload (the largest would overflow int32 if noise were added to it) give NaN;
    the largest finite values round to themselves or inf; nothing wraps."""
    pats = torch.tensor([0x7FFFFFFF, 0x7F800001, 0x7FC00000, 0xFFFFFFFF, 0xFF800001, 0x7F7FFFFF, 0xFF7FFFFF,
                         0x7F800000, 0xFF800000], dtype=torch.int64).to(torch.int32)
    x = pats.repeat(2000).view(torch.float32)
    for key in range(3):
        r = stochastic_round(x, key).float().view(-1, 9)
        assert bool(torch.isnan(r[:, :5]).all())
        big = torch.finfo(torch.bfloat16).max
        assert bool(((r[:, 5] == big) | (r[:, 5] == float("inf"))).all())
        assert bool(((r[:, 6] == -big) | (r[:, 6] == -float("inf"))).all())
        assert bool((r[:, 7] == float("inf")).all() and (r[:, 8] == -float("inf")).all())


def test_kernel_count_report_for_an_8b_layer():
    """The report `make bench` prints: kernels per step at a block's first, middle and last step on the meta
    device, for the default and nearest rounding, beside fused AdamW over the same parameters."""
    from badam_hf.tools.kernel_count import count_llama3_8b_layer, markdown, mta_launches

    # multi_tensor_apply: 320 chunks of 65536 per launch
    assert mta_launches([[torch.empty(320 * 65536, device="meta")]]) == 1
    assert mta_launches([[torch.empty(320 * 65536 + 1, device="meta")]]) == 2
    c = count_llama3_8b_layer()
    assert c["layer_params"] == 218_112_000
    fused = c["fused_adamw"]["kernels"]
    assert c["fused_adamw"]["by_op"]["_fused_adamw_"] == fused - 1 >= 10
    for key in ("badam_default", "badam_nearest"):
        for step in ("first", "middle", "last"):
            assert c[key][step]["kernels"] > fused
    # Only the last step differs, by the stochastic write-back: per tensor a sum, and a pass (xor, add, copy)
    # where nearest copies; its tables are hashed in numpy, so no step runs torch ops on host tensors.
    assert c["badam_default"]["middle"]["kernels"] == c["badam_nearest"]["middle"]["kernels"]
    extra = c["badam_default"]["last"]["kernels"] - c["badam_nearest"]["last"]["kernels"]
    assert extra == 3 * 9 + 1, extra  # 9 tensors; one copy of all the tables
    assert all(c[k][s]["host_ops"] == 0 for k in ("badam_default", "badam_nearest") for s in ("first", "last"))
    assert c["last_step_vs_fused_adamw"] == c["badam_default"]["last"]["kernels"] / fused
    assert "| torch AdamW(fused=True) |" in "\n".join(markdown(c))


def test_the_gpu_formulation_gives_the_cpu_bits():
    """Off the CPU a pass always clamps and masks NaN and reads the high halves with a strided copy; on the CPU a
    NaN-free tensor skips the clamp and the mask and shifts. Both give the same bits (no GPU needed to check the
    arithmetic: the two are run here on CPU tensors)."""
    from badam_hf.core.rounding import _round

    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(5000, generator=g) * 0.02, torch.tensor([0.0, -0.0, 1e38, -3.4e38, float("inf")])])
    noise = torch.randint(0, 65536, (x.numel(),), generator=g, dtype=torch.int32)
    cpu_path = torch.empty(x.numel(), dtype=torch.int16)
    _round(x, noise.clone(), cpu_path, fix_nan=False)
    t = torch.clamp(x.view(torch.int32), max=0x7FC00000).add_(noise)
    gpu_path = t.view(torch.int16)[1::2].clone()
    gpu_path.masked_fill_(torch.isnan(x), 0x7FC0)
    assert torch.equal(cpu_path, gpu_path)
    both = torch.empty_like(cpu_path)
    _round(x, noise.clone(), both, fix_nan=True)
    assert torch.equal(both, cpu_path)
