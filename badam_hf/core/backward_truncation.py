"""Stop the backward pass at the lowest active layer, with or without gradient checkpointing.

BAdam's backward saving comes from the fact that nothing below the lowest active layer needs a gradient.
Two things in the HF stack undo it, and one breaks training outright:

* `activation_checkpointing_enable()` (the Trainer calls it for `--gradient_checkpointing`) installs
  `enable_input_require_grads()`, which makes the embedding output require grad, so autograd records and
  later runs backward through every frozen lower layer.
* With *reentrant* checkpointing, a layer whose positional inputs do not require grad produces an output
  that does not either, so the active layer gets no gradient at all and training silently does nothing.

The fix is one forward pre-hook per stack layer. At the lowest active layer (when nothing trainable runs
before it) it replaces the incoming hidden states by a detached tensor; under reentrant checkpointing
that tensor is made to require grad so the checkpointed layer still produces gradients. HF layers wrap
`forward` (not `__call__`) in the checkpoint, so this hook runs outside the checkpoint, where it must.
HF's input-require-grads hooks are removed when the optimizer is built and again before every forward
(a model-level pre-hook), so enabling checkpointing after the optimizer exists changes nothing.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .partition import Partition


def _is_reentrant_checkpointed(module: nn.Module) -> bool:
    if not (getattr(module, "gradient_checkpointing", False) and module.training):
        return False
    func = getattr(module, "_gradient_checkpointing_func", None)
    keywords = getattr(func, "keywords", None) or {}
    # torch.utils.checkpoint treats a missing use_reentrant as True.
    return keywords.get("use_reentrant", True) is not False


class BackwardTruncation:
    """Owns the pre-hooks; `update(trainable_names)` moves the cut after each block switch."""

    def __init__(self, model: nn.Module, partition: Partition, enabled: bool = True):
        self.model = model
        self.partition = partition
        self.cut_layer: int | None = None
        self._handles = []
        stacks = partition.stacks
        # With two stacks (encoder-decoder) the decoder also reads the encoder's output: no safe single cut.
        self.enabled = enabled and len(stacks) == 1
        # The (HF) modules that can hold `enable_input_require_grads()` hooks.
        self._hf_modules = [m for m in model.modules() if callable(getattr(m, "disable_input_require_grads", None))]
        if self.enabled:
            for i, layer in enumerate(stacks[0].layers):
                self._handles.append(
                    layer.register_forward_pre_hook(functools.partial(self._pre_hook, i), with_kwargs=True)
                )
            # Checkpointing may be enabled after the optimizer is built (re-installing HF's hooks): drop them
            # again before each forward, ahead of the embedding that they act on.
            self._handles.append(model.register_forward_pre_hook(self._drop_hook))
            self.drop_input_require_grads()

    def drop_input_require_grads(self) -> None:
        """Remove HF's `enable_input_require_grads()` hooks: the pre-hook makes them unnecessary, and they
        would make every frozen layer below the active one record an autograd graph (and, when no stack
        layer is active, run backward through the whole frozen stack)."""
        for module in self._hf_modules:
            if getattr(module, "_require_grads_hooks", None):
                module.disable_input_require_grads()

    def _drop_hook(self, module: nn.Module, args) -> None:
        self.drop_input_require_grads()

    def update(self, trainable_names) -> None:
        trainable = list(trainable_names)
        if not self.enabled or any(n in self.partition.input_side for n in trainable):
            self.cut_layer = None
            return
        self.cut_layer = self.partition.lowest_layer(trainable)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre_hook(self, index: int, module: nn.Module, args, kwargs):
        if index != self.cut_layer or not torch.is_grad_enabled():
            return None
        # HF passes the hidden states positionally (reentrant checkpointing requires it); accept a kwarg too.
        if args and torch.is_tensor(args[0]):
            return (self._cut(module, args[0]), *args[1:]), kwargs
        if torch.is_tensor(kwargs.get("hidden_states")):
            kwargs = dict(kwargs, hidden_states=self._cut(module, kwargs["hidden_states"]))
            return args, kwargs
        return None

    @staticmethod
    def _cut(module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        cut = hidden.detach()
        if _is_reentrant_checkpointed(module) and cut.is_floating_point():
            cut.requires_grad_(True)
        return cut
