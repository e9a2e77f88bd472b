"""What the installed transformers provides where its supported releases differ, found by looking for the
feature, never by comparing version numbers. Every such difference badam_hf meets is answered here, in one
place (the patch targets of `integrations.patches` are looked up by name and refused when missing).

Supported: transformers 5.18 and newer (pyproject.toml has lower bounds only; `make compat` tests both ends).
The differences inside that range:

- Activation checkpointing was renamed: newer releases have `model.activation_checkpointing_enable(
  activation_checkpointing_kwargs=...)` and the TrainingArguments field `activation_checkpointing`, keeping
  `gradient_checkpointing*` as deprecated aliases; 5.18 has only the `gradient_checkpointing*` names.
- Where a checkpointed layer's forward pre-hooks run: 5.18's `GradientCheckpointingLayer` checkpoints the
  whole `__call__`, so the hooks run inside the checkpoint; newer releases checkpoint `forward` and leave them
  outside. `core.backward_truncation` cuts the backward in a pre-hook and needs to know which.

transformers is imported inside the functions: `badam_hf.core` imports no transformers at module level.
"""

from __future__ import annotations

import functools

NEW_CHECKPOINTING = "activation_checkpointing"
OLD_CHECKPOINTING = "gradient_checkpointing"


def _has_activation_checkpointing_method(model) -> bool:
    return callable(getattr(model, "activation_checkpointing_enable", None))


def enable_activation_checkpointing(model, use_reentrant: bool | None = None, **kwargs) -> None:
    """`model.activation_checkpointing_enable(...)` where it exists, else `gradient_checkpointing_enable(...)`
    with the same keyword arguments (`use_reentrant` goes into the kwargs dict both take)."""
    if use_reentrant is not None:
        kwargs["use_reentrant"] = use_reentrant
    if _has_activation_checkpointing_method(model):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


@functools.cache
def training_args_fields() -> frozenset[str]:
    import dataclasses

    from transformers import TrainingArguments

    return frozenset(f.name for f in dataclasses.fields(TrainingArguments))


def checkpointing_field() -> str:
    """The TrainingArguments field that turns activation checkpointing on: the new name where it exists."""
    return NEW_CHECKPOINTING if NEW_CHECKPOINTING in training_args_fields() else OLD_CHECKPOINTING


def checkpointing_aliases() -> dict[str, str]:
    """Either name of each checkpointing field (and its `_kwargs` twin) -> the one the installed
    TrainingArguments prefers, so recipes and scripts may use either name on every supported release."""
    new = checkpointing_field()
    old = OLD_CHECKPOINTING if new == NEW_CHECKPOINTING else NEW_CHECKPOINTING
    return {name + suffix: new + suffix for name in (old, new) for suffix in ("", "_kwargs")}


@functools.cache
def layer_hooks_run_inside_checkpoint() -> bool:
    """True where `GradientCheckpointingLayer` checkpoints `__call__` (5.18), so a layer's forward pre-hooks run
    inside the checkpoint; False where it checkpoints `forward` (the hooks run outside), or where there is no
    such class."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return False
    return "__call__" in vars(GradientCheckpointingLayer)
