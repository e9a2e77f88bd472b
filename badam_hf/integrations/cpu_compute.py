"""bf16 weights on a CPU without bf16 arithmetic: compute each linear layer's products in fp32.

Where the CPU has neither AVX512-BF16 nor AMX, torch's bf16 matmul falls back to a slow kernel (measured on a
2-core AVX2 EPYC: a 1024^3 product in 3.1 s against 0.04 s in fp32; SmolLM2-135M forward + backward on 4 x 256
tokens in 110 s against 23 s). `fp32_linear_compute()` keeps the weights, inputs and outputs bf16 (BAdam's
setting and its memory) and runs only the products in fp32, rounding the results back to bf16; backward saves
the same bf16 tensors the native op saves and upcasts them again. Under CPU bf16 autocast (fp32 weights) it
does what autocast does (bf16 inputs, a bf16 result) with the product in fp32. On a GPU, or a CPU with native
bf16, it changes nothing. Used by the CPU runs of the recipes, the demo and the convergence benchmark.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

ENV = "BADAM_HF_CPU_FP32_LINEAR"  # "1": always on CPU, "0": never, unset: where the CPU lacks native bf16
_NATIVE_FLAGS = ("avx512_bf16", "amx_bf16")
_original_linear = F.linear


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). Unknown (no /proc/cpuinfo): assume so."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(f in flags for f in _NATIVE_FLAGS)


@functools.lru_cache(maxsize=1)
def cpu_description() -> str:
    """The CPU's model name, how many CPUs this process sees and which bf16 flags it has, for timings to name
    their machine: e.g. "AMD EPYC, 2 CPUs, avx512_bf16"."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    field = lambda key: next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), "")
    name = field("model name") or platform.processor() or platform.machine()
    bf16 = [f for f in _NATIVE_FLAGS if f in field("flags").split()]
    return f"{name}, {os.cpu_count()} CPUs, {', '.join(bf16) if bf16 else 'no bf16 arithmetic (no avx512_bf16/amx_bf16)'}"


def wanted() -> bool:
    """Whether CPU bf16 linears should compute in fp32 here ($BADAM_HF_CPU_FP32_LINEAR decides when set)."""
    value = os.environ.get(ENV, "").strip()
    if value in ("0", "1"):
        return value == "1"
    if value:
        raise ValueError(f"${ENV}={value!r}: use 1 (always on CPU), 0 (never) or leave it unset (decide by the CPU).")
    return not cpu_has_native_bf16()


class _Fp32Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.with_bias = bias is not None
        out = _original_linear(x.float(), weight.float(), None if bias is None else bias.float())
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.float()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g @ weight.float()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = (g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
        if ctx.with_bias and ctx.needs_input_grad[2]:
            gb = g.reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)
        return gx, gw, gb


def _linear(input, weight, bias=None):
    if input.device.type != "cpu" or torch.compiler.is_compiling():
        return _original_linear(input, weight, bias)
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        # What bf16 autocast does (inputs cast to bf16, a bf16 result), with the product in fp32.
        bf16 = torch.bfloat16
        with torch.autocast("cpu", enabled=False):
            return _Fp32Linear.apply(input.to(bf16), weight.to(bf16), None if bias is None else bias.to(bf16))
    if input.dtype == weight.dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.bfloat16):
        return _Fp32Linear.apply(input, weight, bias)
    return _original_linear(input, weight, bias)


@contextlib.contextmanager
def fp32_linear_compute(enabled: bool | None = None):
    """Inside: `torch.nn.functional.linear` (what nn.Linear calls) computes CPU bf16 products in fp32.
    `enabled=None` decides by `wanted()`. Restores the original on exit; nests."""
    if enabled is None:
        enabled = wanted()
    if not enabled or F.linear is _linear:
        yield enabled
        return
    F.linear = _linear
    try:
        yield True
    finally:
        F.linear = _original_linear
