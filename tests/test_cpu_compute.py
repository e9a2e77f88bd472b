"""CPU bf16 linears computed in fp32 (`badam_hf.integrations.cpu_compute`): the same values as an fp32 product
rounded to bf16, the right gradients, nothing changed outside the context or for other dtypes, and BAdam's
block training and backward truncation unchanged inside it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from badam_hf import BlockOptimizer
from badam_hf.integrations import cpu_compute
from badam_hf.integrations.cpu_compute import fp32_linear_compute
from tiny_models import tiny_llama


def _tensors(seed: int, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 48, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(40, 48, generator=g) / 7).to(dtype).requires_grad_()
    b = torch.randn(40, generator=g).to(dtype).requires_grad_()
    return x, w, b


def test_values_and_gradients_are_the_fp32_ones_rounded_to_bf16():
    x, w, b = _tensors(0)
    upstream = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(1)).bfloat16()
    with fp32_linear_compute(enabled=True):
        y = torch.nn.functional.linear(x, w, b)
    (y.float() * upstream.float()).sum().backward()
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, _fp32_product(x, w, b))
    # gradients: each the fp32 product rounded once to bf16 (float64 reference, within one bf16 rounding)
    g = upstream.double()
    for got, want in ((x.grad, g @ w.detach().double()),
                      (w.grad, g.reshape(-1, 40).t() @ x.detach().double().reshape(-1, 48)),
                      (b.grad, g.reshape(-1, 40).sum(0))):
        assert got.dtype == torch.bfloat16
        assert ((got.double() - want).abs() <= want.abs() * 2**-8 + 1e-6).all()


def _fp32_product(x, w, b):
    return F.linear(x.detach().float(), w.detach().float(), b.detach().float()).bfloat16()


def test_the_original_is_back_after_the_context_and_other_dtypes_pass_through():
    original = F.linear
    with fp32_linear_compute(enabled=True):
        assert F.linear is not original
        with fp32_linear_compute(enabled=True):  # nests
            pass
        assert F.linear is not original
        x, w, b = _tensors(2, torch.float32)
        assert torch.equal(F.linear(x, w, b), original(x, w, b))  # fp32 untouched
    assert F.linear is original
    with fp32_linear_compute(enabled=False) as on:
        assert F.linear is original and on is False


def test_under_bf16_autocast_it_is_autocast_with_the_product_in_fp32():
    x, w, b = _tensors(5, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        native = F.linear(x, w, b)
        with fp32_linear_compute(enabled=True):
            y = torch.nn.functional.linear(x, w, b)
    assert y.dtype == native.dtype == torch.bfloat16
    assert torch.equal(y, _fp32_product(x.bfloat16(), w.bfloat16(), b.bfloat16()))
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32  # to the fp32 leaves, like autocast


def test_only_the_inputs_that_need_a_gradient_get_one():
    x, w, b = _tensors(3)
    w.requires_grad_(False)
    b.requires_grad_(False)
    with fp32_linear_compute(enabled=True):
        torch.nn.functional.linear(x, w, b).float().sum().backward()
    assert x.grad is not None and w.grad is None and b.grad is None


@pytest.mark.parametrize("value,expected", [("1", True), ("0", False)])
def test_the_environment_variable_decides_when_set(monkeypatch, value, expected):
    monkeypatch.setenv(cpu_compute.ENV, value)
    assert cpu_compute.wanted() is expected


def test_a_bad_environment_value_is_refused(monkeypatch):
    monkeypatch.setenv(cpu_compute.ENV, "yes")
    with pytest.raises(ValueError, match=r"BADAM_HF_CPU_FP32_LINEAR='yes'.*use 1 .* 0 "):
        cpu_compute.wanted()


def test_badam_trains_only_its_block_and_truncates_backward_inside():
    """A bf16 BAdam step inside the context: the active layer changes, everything else stays bit-identical,
    and no frozen parameter below the active layer was reached by backward (no gradient anywhere else)."""
    model = tiny_llama(layers=4, dtype=torch.bfloat16)
    opt = BlockOptimizer(model, lr=1e-2, switch_mode="fixed", start_block=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(4))
    with fp32_linear_compute(enabled=True):
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if "layers.2." not in n)
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("layers.2." in n for n in changed)


def test_the_cpu_description_names_the_model_the_cpus_and_the_bf16_flags(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some Xeon(R) CPU\nflags\t\t: fpu avx2 amx_bf16 avx512_bf16\n")
    real = cpu_compute.Path

    monkeypatch.setattr(cpu_compute, "Path", lambda p: info if p == "/proc/cpuinfo" else real(p))
    monkeypatch.setattr(cpu_compute.os, "cpu_count", lambda: 7)
    cpu_compute.cpu_description.cache_clear()
    try:
        assert cpu_compute.cpu_description() == "Some Xeon(R) CPU, 7 CPUs, avx512_bf16, amx_bf16"
        info.write_text("model name\t: Old Box\nflags\t\t: fpu avx2\n")
        cpu_compute.cpu_description.cache_clear()
        assert cpu_compute.cpu_description() == "Old Box, 7 CPUs, no bf16 arithmetic (no avx512_bf16/amx_bf16)"
    finally:
        cpu_compute.cpu_description.cache_clear()
