"""Parameters replaced by an engine after the optimizer was built (accelerate's FSDP2 prepare).

The Trainer builds the optimizer first and then lets accelerate shard the model in place with FSDP2, which
turns every parameter into a new DTensor. `BlockOptimizer` looks once, at its first step (and in
`state_dict` / `load_state_dict` before it), and picks up the new parameters.
"""

from __future__ import annotations

from torch import nn

from .errors import BAdamConfigError


def current_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's parameters under their names before wrapping: wrappers applied in place may add
    `_checkpoint_wrapped_module.` (activation checkpointing) or `_orig_mod.` (torch.compile) to them."""
    return {
        n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): p
        for n, p in model.named_parameters()
    }


class ParameterRebinding:
    """`rebind_parameters`, and the first-step check that calls it, as a base class of `BlockOptimizer`."""

    def _init_rebinding(self) -> None:
        # A step pre-hook cannot remove itself while torch iterates over the hooks, so it stays and returns at
        # once after the first step.
        self._has_stepped = False
        self.register_step_pre_hook(lambda opt, args, kwargs: self._first_step_pre_hook())

    def rebind_parameters(self) -> bool:
        """Pick up parameters that an engine replaced after this optimizer was built. The Trainer builds the
        optimizer first and then lets accelerate shard the model in place with FSDP2, which turns every
        parameter into a new DTensor. The active block then gets fresh masters from the new parameters.
        Runs by itself at the first step (and in state_dict / load_state_dict before it); engines that
        replace parameters call it when they attach. Returns whether anything changed."""
        now = list(self.model.parameters())
        if len(now) == len(self._params) and all(a is b for a, b in zip(now, self._params.values())):
            return False
        current = current_parameters(self.model)
        if all(current.get(n) is p for n, p in self._params.items()) and len(current) == len(self._params):
            return False
        if current.keys() != self._params.keys():
            missing = sorted(set(self._params) - set(current))[:2]
            raise BAdamConfigError(
                f"the model's parameters changed names after the BlockOptimizer was built (e.g. {missing} are gone); "
                "build the optimizer after wrapping the model."
            )
        self._drop_state_of(self._trainable)
        self._params = {n: current[n] for n in self._names}
        for p in self._params.values():
            p.requires_grad_(False)
        self._inactive.forget_hooks()  # their hooks (inactive_timing=backward) went with the old parameters
        self._activate(self.active_blocks, fresh=True)
        return True

    def _first_step_pre_hook(self) -> None:
        if not self._has_stepped:
            self._rebind_if_not_stepped()
            self._has_stepped = True

    def _rebind_if_not_stepped(self) -> None:
        if not self._has_stepped and self._driver is None and not self.closed:  # a driving engine owns the parameters' layout
            self.rebind_parameters()
