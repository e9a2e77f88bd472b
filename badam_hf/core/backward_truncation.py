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
that tensor is made to require grad so the checkpointed layer still produces gradients. Newer HF layers
wrap `forward` (not `__call__`) in the checkpoint, so this hook runs outside the checkpoint, where it must.
transformers 5.18 checkpoints the whole `__call__` (`core.hf_features`): there the layer's checkpoint function
is wrapped as well, and the cut is made on its inputs, before the checkpoint sees them.
HF's input-require-grads hooks are removed when the optimizer is built and again before every forward
(a model-level pre-hook), so enabling checkpointing after the optimizer exists changes nothing.

Models with several stacks (an encoder-decoder's encoder and decoder, a vision-language model's vision
tower and language model) are cut stack by stack: each stack at its lowest active layer, unless something
trainable runs before that stack (`StackInfo.upstream`: for a decoder that includes the whole encoder, for a
language model the vision tower and projector), since the cut would then drop that part's gradient.

A forward whose loss depends on no trainable parameter (the active block is a vision layer and the batch has
no image, or a layer whose output the model never reads) would make `loss.backward()` fail with "element 0 of
tensors does not require grad". A model-level forward hook then ties the loss to a dummy leaf so backward
runs; the block gets no gradient, the optimizer step leaves it unchanged (the inner optimizer skips
parameters without a gradient), and the step still counts towards `switch_every`: the schedule stays a pure
function of the step count, which resume, the Trainer's step counter and every DDP rank rely on. It is
logged once per block activation (`gradless_forwards` counts them).
"""

from __future__ import annotations

import functools
import logging
import weakref

import torch
from torch import nn

from .hf_features import layer_hooks_run_inside_checkpoint
from .partition import Partition

logger = logging.getLogger(__name__)


class _TieToAnchor(torch.autograd.Function):
    """A copy of `x` made part of a graph through `anchor`, a leaf that requires grad; the gradient stops
    there. (A copy, not a view: the Trainer scales the loss in place, which autograd forbids on a view made
    inside a custom Function.)"""

    @staticmethod
    def forward(ctx, x, anchor):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, None


def _is_reentrant_checkpointed(module: nn.Module) -> bool:
    if not (getattr(module, "gradient_checkpointing", False) and module.training):
        return False
    func = getattr(module, "_gradient_checkpointing_func", None)
    func = getattr(func, "_badam_checkpoint", func)  # see BackwardTruncation._cut_before_checkpoint
    keywords = getattr(func, "keywords", None) or {}
    # torch.utils.checkpoint treats a missing use_reentrant as True.
    return keywords.get("use_reentrant", True) is not False


class BackwardTruncation:
    """Owns the pre-hooks; `update(trainable_names)` moves the cuts after each block switch."""

    def __init__(self, model: nn.Module, partition: Partition, enabled: bool = True):
        self.model = model
        self.partition = partition
        self.chain = list(partition.chain)
        # The stack whose cut `cut_layer` reports: the one the blocks' layer indices refer to.
        self._primary = partition.stacks[0].path if partition.stacks and partition.layer_of else None
        self.cuts: dict[str, int | None] = {info.stack.path: None for info in self.chain}
        self._handles = []
        self._trainable: set[str] = set()
        self._warned = False
        self.gradless_forwards = 0  # forwards whose loss depended on no trainable parameter
        self._anchor: torch.Tensor | None = None  # made on first use (a model whose blocks always get gradients never needs it)
        self.enabled = enabled and bool(self.chain)
        # The (HF) modules that can hold `enable_input_require_grads()` hooks.
        self._hf_modules = [m for m in model.modules() if callable(getattr(m, "disable_input_require_grads", None))]
        # (stack path, index, layer) whose checkpoint function must make the cut (hooks inside the checkpoint).
        self._wrapped_layers: list[tuple[str, int, nn.Module]] = []
        self._dropped_input_hooks: set[nn.Module] = set()  # where HF's hooks were: `remove` puts them back
        # The modules the hooks were put on, as weak references: `copy.deepcopy` copies a module's hooks (and
        # this object with them) but not a weak reference, so in a copy of the model they see other modules
        # and do nothing (a deep copy, e.g. a frozen reference model, gets no backward cut of its own).
        self._owner = weakref.ref(model)
        self._layers = {(info.stack.path, i): weakref.ref(layer) for info in self.chain
                        for i, layer in enumerate(info.stack.layers)}
        self._handles.append(model.register_forward_hook(self._gradless_hook))
        if self.enabled:
            for info in self.chain:
                for i, layer in enumerate(info.stack.layers):
                    self._handles.append(layer.register_forward_pre_hook(
                        functools.partial(self._pre_hook, info.stack.path, i), with_kwargs=True))
            # Checkpointing may be enabled after the optimizer is built (re-installing HF's hooks): drop them
            # again before each forward, ahead of the embedding that they act on.
            self._handles.append(model.register_forward_pre_hook(self._drop_hook))
            self.drop_input_require_grads()
            if layer_hooks_run_inside_checkpoint():
                self._wrapped_layers = [(info.stack.path, i, layer) for info in self.chain
                                        for i, layer in enumerate(info.stack.layers)]
                self._wrap_checkpoint_funcs()

    @property
    def cut_layer(self) -> int | None:
        """The cut in the partition's layer stack (a VLM's language model); see `cuts` for every stack."""
        return self.cuts.get(self._primary) if self._primary is not None else None

    @cut_layer.setter
    def cut_layer(self, value: int | None) -> None:
        # Moves the primary stack's cut until the next switch (None: a full backward there; bench and
        # gpu_check measure the untruncated backward this way).
        if self._primary is not None:
            self.cuts[self._primary] = value

    def drop_input_require_grads(self) -> None:
        """Remove HF's `enable_input_require_grads()` hooks: the pre-hook makes them unnecessary, and they
        would make every frozen layer below the active one record an autograd graph (and, when no stack
        layer is active, run backward through the whole frozen stack)."""
        for module in self._hf_modules:
            if getattr(module, "_require_grads_hooks", None):
                module.disable_input_require_grads()
                self._dropped_input_hooks.add(module)

    def _drop_hook(self, module: nn.Module, args) -> None:
        if module is not self._owner():
            return
        self.drop_input_require_grads()
        self._wrap_checkpoint_funcs()  # checkpointing enabled after the optimizer sets new functions

    def _wrap_checkpoint_funcs(self) -> None:
        """Where the layers' pre-hooks run inside the checkpoint (transformers 5.18), a reentrant checkpoint of
        the lowest active layer would see inputs that do not require grad and give the layer no gradient at all:
        wrap each layer's checkpoint function so the cut is made on its inputs first."""
        for path, index, layer in self._wrapped_layers:
            func = getattr(layer, "_gradient_checkpointing_func", None)
            if func is not None and not hasattr(func, "_badam_checkpoint"):
                layer._gradient_checkpointing_func = self._cut_before_checkpoint(path, index, layer, func)

    def _cut_before_checkpoint(self, path: str, index: int, layer: nn.Module, checkpoint):
        return _CutThenCheckpoint(self, path, index, layer, checkpoint)

    def _unwrap_checkpoint_funcs(self) -> None:
        for _, _, layer in self._wrapped_layers:
            func = getattr(layer, "_gradient_checkpointing_func", None)
            if hasattr(func, "_badam_checkpoint"):
                layer._gradient_checkpointing_func = func._badam_checkpoint
        self._wrapped_layers = []

    def update(self, trainable_names) -> None:
        trainable = set(trainable_names)
        self._trainable = trainable
        self._warned = False
        for info in self.chain:
            if not self.enabled or trainable & info.upstream:
                self.cuts[info.stack.path] = None  # a trainable part feeds this stack: its backward must run
                continue
            idx = [info.layer_of[n] for n in trainable if n in info.layer_of]
            self.cuts[info.stack.path] = min(idx) if idx else None

    def remove(self) -> None:
        """Remove every hook this installed, and put back HF's input-require-grads hooks it took away (a later
        run without BAdam, e.g. LoRA with checkpointing, relies on them). Idempotent."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._unwrap_checkpoint_funcs()
        for module in self._dropped_input_hooks:
            if not getattr(module, "_require_grads_hooks", None):
                module.enable_input_require_grads()
        self._dropped_input_hooks.clear()
        self.cuts = dict.fromkeys(self.cuts)
        self._trainable = set()
        self._anchor = None

    def _pre_hook(self, path: str, index: int, module: nn.Module, args, kwargs):
        if index != self.cuts.get(path) or not torch.is_grad_enabled() or module is not self._layers[path, index]():
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

    def _gradless_hook(self, module: nn.Module, args, output):
        """Make a loss that no trainable parameter reached differentiable (see the module docstring)."""
        if not (module.training and torch.is_grad_enabled() and self._trainable) or module is not self._owner():
            return None
        key = "loss" if torch.is_tensor(getattr(output, "loss", None)) else "logits"
        value = getattr(output, key, None)
        if not torch.is_tensor(value) or value.requires_grad or not value.is_floating_point():
            return None
        self.gradless_forwards += 1
        if not self._warned:
            self._warned = True
            blocks = [b.name for b in self.partition.blocks if self._trainable.intersection(b.param_names)]
            logger.warning(
                "badam_hf: no trainable parameter of the active block(s) %s took part in this forward (e.g. a vision "
                "layer on a text-only batch); the block gets no gradient from it, and a step that gets none at all "
                "leaves the block unchanged and still counts towards switch_every.", ", ".join(blocks) or "-")
        if self._anchor is None or self._anchor.device != value.device:
            self._anchor = torch.zeros((), device=value.device, requires_grad=True)
        setattr(output, key, _TieToAnchor.apply(value, self._anchor))
        return output


class _CutThenCheckpoint:
    """A layer's checkpoint function that makes the backward cut on the layer's input first (see
    `BackwardTruncation._wrap_checkpoint_funcs`). It holds its layer twice: strongly, which `copy.deepcopy` of
    the model maps to the copied layer, and weakly, which a deep copy keeps pointing at the original; in a
    copy the two differ and it only checkpoints."""

    def __init__(self, truncation: BackwardTruncation, path: str, index: int, layer: nn.Module, checkpoint):
        self.truncation, self.path, self.index, self._badam_checkpoint = truncation, path, index, checkpoint
        self.layer, self.original = layer, weakref.ref(layer)

    def __call__(self, function, *args, **kwargs):
        t = self.truncation
        if (self.index == t.cuts.get(self.path) and self.layer is self.original() and torch.is_grad_enabled()
                and args and torch.is_tensor(args[0])):
            args = (t._cut(self.layer, args[0]), *args[1:])
        return self._badam_checkpoint(function, *args, **kwargs)

