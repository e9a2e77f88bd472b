"""torch.compile for BAdam: compile each layer of the stack (regional compilation), not the whole model.

A whole-model `torch.compile` bakes BAdam's per-block state into the graph's guards: which parameters
require grad, and where the backward truncation cuts (its pre-hook reads `cut_layer`). Every block switch
fails those guards, dynamo recompiles the whole model, and after `recompile_limit` switches it silently
falls back to eager. Compiling each stack layer's `forward` instead gives all layers one compiled code
(same code object, parameters as graph inputs) with a bounded number of variants, whatever D is: a frozen
layer below the active one (no grad anywhere), the active layer (trainable weights, input cut from the
graph), a frozen layer above it (its input requires grad), and the same with checkpointing or an
always-active input side. The truncation hook stays outside the compiled region: it runs in the module's
`__call__`, only `forward` is compiled. The embedding, final norm, head and loss stay eager.

Train with `model.config.use_cache = False`: transformers otherwise builds a KV cache in every forward, and
its per-layer state (`cache.layers[i].is_initialized`) gives each layer a compiled variant of its own.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .partition import Partition

_MARK = "_badam_compiled_forward"


def compile_layers(model: nn.Module, partition: Partition, **compile_kwargs: Any) -> list[nn.Module]:
    """Replace each stack layer's `forward` by `torch.compile(forward, **compile_kwargs)`, in place and once.
    Returns the layers compiled now."""
    if getattr(getattr(model, "config", None), "use_cache", False):
        warnings.warn(
            "model.config.use_cache is True: transformers then builds a KV cache in every training forward, whose "
            "per-layer state makes each compiled layer recompile on its own (D variants instead of a few). Set "
            "model.config.use_cache = False for training.",
            UserWarning,
            stacklevel=2,
        )
    done = []
    for stack in partition.stacks:
        for layer in stack.layers:
            if getattr(layer, _MARK, False):
                continue
            layer.forward = torch.compile(layer.forward, **compile_kwargs)
            setattr(layer, _MARK, True)
            done.append(layer)
    return done


def is_layer_compiled(layer: nn.Module) -> bool:
    return bool(getattr(layer, _MARK, False))
