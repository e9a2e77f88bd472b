"""How many device kernels one optimizer step launches, counted on the meta device without a GPU.

`KernelCounter` (a `TorchDispatchMode`) sees every aten op of the step. An op that makes no new values (a view,
an allocation) launches nothing; an elementwise or copy op on a device tensor launches one kernel (CUDA's
TensorIterator runs any size in one launch below 2**31 entries); an op on CPU tensors is host work, counted
apart. `_foreach_*` and `_fused_*` ops launch as CUDA's multi_tensor_apply does: chunks of 65536 entries, at
most 320 chunks and a depth-dependent number of tensors per launch (torch 2.x's constants in
ATen/native/cuda/MultiTensorApply.cuh), so fused AdamW over a big layer counts the launches it makes, not one.

`count_llama3_8b_layer()` counts BlockOptimizer's step at a block's first, middle and last step (K=3) over one
Llama 3-8B decoder layer (bf16 weights, the default settings, and `switch_rounding=nearest` beside them) and
torch's fused AdamW over the same parameters (fp32, a step with moments): what `make bench` reports.
"""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# multi_tensor_apply (ATen/native/cuda/MultiTensorApply.cuh)
MTA_CHUNK = 65536
MTA_MAX_BLOCKS = 320
MTA_MAX_TENSORS = (110, 64, 48, 36, 30)  # by depth (number of tensor lists) 1..5

NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
             "lift_fresh", "set_", "_local_scalar_dense", "resize_"}

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256)


def mta_launches(lists: list[list[torch.Tensor]]) -> int:
    """Launches of one multi_tensor_apply over tensor lists of equal length (their depth is len(lists))."""
    depth = min(max(len(lists), 1), len(MTA_MAX_TENSORS))
    max_tensors = MTA_MAX_TENSORS[depth - 1]
    launches = tensors = blocks = 0
    for t in lists[0]:
        n = t.numel()
        if n == 0:
            continue
        tensors += 1
        chunks = math.ceil(n / MTA_CHUNK)
        for c in range(chunks):
            blocks += 1
            full = tensors == max_tensors and c == chunks - 1
            if blocks == MTA_MAX_BLOCKS or full:
                launches += 1
                blocks = 0
                if c == chunks - 1:
                    tensors = 0
                else:
                    tensors = 1  # the tensor goes on in the next launch
    return launches + (1 if blocks else 0)


class KernelCounter(TorchDispatchMode):
    """Counts the kernels the ops under it would launch on the device (`device`, and host ops apart)."""

    def __init__(self):
        super().__init__()
        self.device = 0
        self.host = 0
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in NO_KERNEL:
            return out
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if not tensors:
            return out
        if all(t.device.type == "cpu" for t in tensors):
            self.host += 1
            return out
        if name.startswith(("_foreach_", "_fused_")):
            lists = [a for a in list(args) + list(kwargs.values())
                     if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
            if name.startswith("_foreach_") and not name.endswith("_") and isinstance(out, (list, tuple)):
                lists.append(list(out))  # an out-of-place foreach op writes one more list
            lists = [ls for ls in lists if len(ls) == len(lists[0])]
            n = mta_launches(lists)
        else:
            n = 1
        self.device += n
        self.by_op[name] = self.by_op.get(name, 0) + n
        return out


def _layer_model(num_layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=num_layers, tie_word_embeddings=False, use_cache=False, **LLAMA3_8B)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            return LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)


def _count(fn) -> dict:
    with KernelCounter() as c:
        fn()
    return {"kernels": c.device, "host_ops": c.host, "by_op": dict(sorted(c.by_op.items(), key=lambda kv: -kv[1]))}


def count_block_steps(**settings) -> dict:
    """BlockOptimizer's step over decoder layer 0 of a Llama 3-8B (meta), K=3: first, middle and last step."""
    from ..core.optimizer import BlockOptimizer
    from .dry_run import meta_workarounds

    with meta_workarounds():  # fused AdamW on meta, as on CUDA
        model = _layer_model()
        opt = BlockOptimizer(model, lr=1e-5, switch_every=3, switch_mode="ascending", **settings)
        out = {}
        for step in ("first", "middle", "last"):
            for name in opt.trainable_names:
                p = model.get_parameter(name)
                p.grad = torch.empty_like(p)  # the backward's gradient (its fp32 copy is part of the step)
            out[step] = _count(opt.step)
            opt.zero_grad(set_to_none=True)
    return out


def count_fused_adamw() -> dict:
    """torch's fused AdamW over the same layer's parameters (fp32 on meta), a step with its moments."""
    from .dry_run import meta_workarounds

    with meta_workarounds():
        model = _layer_model()
        params = [p.detach().float().requires_grad_() for p in model.model.layers[0].parameters()]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
        for p in params:
            p.grad = torch.empty_like(p)
        opt.step()  # makes the moments
        return _count(opt.step)


def count_llama3_8b_layer() -> dict:
    """The report: kernels per optimizer step, badam_hf (default and nearest) and fused AdamW, one 8B layer."""
    model = _layer_model()
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    default = count_block_steps()
    nearest = count_block_steps(switch_rounding="nearest")
    fused = count_fused_adamw()
    return {
        "layer_params": layer_params,
        "badam_default": default,
        "badam_nearest": nearest,
        "fused_adamw": fused,
        "last_step_vs_fused_adamw": default["last"]["kernels"] / fused["kernels"],
    }


def markdown(counts: dict) -> list[str]:
    f = counts["fused_adamw"]["kernels"]
    lines = ["", f"## Kernels per optimizer step, one Llama 3-8B decoder layer ({counts['layer_params'] / 1e6:.0f}M "
             "parameters, counted on the meta device)", "",
             "Device kernels each step would launch (badam_hf.tools.kernel_count: one per elementwise/copy op, "
             "multi_tensor_apply's launches for foreach/fused ops; host ops on CPU tensors apart). BlockOptimizer "
             "with K=3 over decoder layer 0; fused AdamW over the same parameters in fp32.", "",
             "| optimizer | first step | middle step | last step | host ops (last) | last / fused AdamW |",
             "|---|---|---|---|---|---|"]
    for key, label in (("badam_default", "badam_hf, default (stochastic at the block's end)"),
                       ("badam_nearest", "badam_hf, switch_rounding=nearest")):
        d = counts[key]
        lines.append(f"| {label} | {d['first']['kernels']} | {d['middle']['kernels']} | {d['last']['kernels']} | "
                     f"{d['last']['host_ops']} | {d['last']['kernels'] / f:.1f} |")
    lines.append(f"| torch AdamW(fused=True) | {f} | {f} | {f} | {counts['fused_adamw']['host_ops']} | 1.0 |")
    return lines


if __name__ == "__main__":
    import json

    print(json.dumps(count_llama3_8b_layer(), indent=1))
