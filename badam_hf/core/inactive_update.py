"""BREAD's inactive update: a stateless step (sgd or signsgd) for the parameters Adam does not train in the
current block (`inactive_update`). No moments and no masters.

`inactive_timing=step` (default): the step is taken in `BlockOptimizer.step()`, after the step's non-finite
check (which covers these gradients too) and after a loss scaler would have unscaled: a NaN anywhere in the
step's backward leaves every weight bit-identical, inactive ones included. The price is that the inactive
gradients (in the weights' dtype) wait on the parameters from the backward to the step; gradient clipping
sees them (they are part of the step's gradient).

`inactive_timing=backward`: a post-accumulate-grad hook takes the step in the last micro-batch's backward
(`BlockOptimizer.register_boundary_check`; earlier micro-batches accumulate) as each gradient completes, and
frees it at once, so the frozen layers cost no memory beyond the backward's. Clipping comes too late to see
them. Each gradient is checked first against a device-side flag "all finite so far in this backward" (no
host sync): from the first non-finite gradient on, the updates land as zeros and `step()` finds the flag and
skips the step. What landed before that gradient in the same backward stays.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.hooks import RemovableHandle

from .rounding import INACTIVE_STREAM, global_start, rounding_key, stochastic_add_
from .shards import local_shard


class InactiveUpdate:
    """The inactive update of one `BlockOptimizer` (`opt`): which parameters take it (`names`), made to require
    grad so the backward leaves their gradients. `follow(active)` re-targets it at each (re)activation; without
    `inactive_update` it holds nothing."""

    def __init__(self, opt):
        self.opt = opt
        self.names: list[str] = []  # frozen-for-Adam names that take the step in the current block
        self.hooks: dict[str, RemovableHandle] = {}  # inactive_timing=backward: name -> its grad hook
        # inactive_timing=backward with skip_nonfinite: device -> bool scalar, "every inactive gradient of this
        # backward was finite so far"; read (with the step's other checks) and dropped by `step()`.
        self.finite: dict[torch.device, torch.Tensor] = {}

    @property
    def in_backward(self) -> bool:
        return self.opt.config.inactive.inactive_timing == "backward"

    def follow(self, active: list[str]) -> None:
        """Take the step on what the active names `active` leave (within `inactive_scope`)."""
        self.set(self.scope(active) if self.opt.config.inactive.enabled else [])

    def scope(self, active: list[str]) -> list[str]:
        """`inactive_scope=all`: every other parameter. `above`: those whose backward runs anyway, i.e. at or
        above the lowest active position (input side < layers 0..L-1 < output side), so the truncation holds."""
        active_set = set(active)
        rest = [n for n in self.opt._names if n not in active_set]
        if self.opt.config.inactive.inactive_scope == "all":
            return rest
        part = self.opt.partition
        top = len(part.stacks[0].layers) if part.stacks else 0

        def position(name: str) -> int:
            if name in part.input_side:
                return -1
            return part.layer_of.get(name, top)

        lowest = min((position(n) for n in active), default=top)
        return [n for n in rest if position(n) >= lowest]

    def set(self, names: list[str]) -> None:
        """Take the step on exactly `names`; a name that leaves is frozen again (unless the inner optimizer
        trains it)."""
        params, keep = self.opt._params, set(names)
        for name in self.names:
            if name not in keep:
                params[name].grad = None
                if name not in self.opt._trainable:
                    params[name].requires_grad_(False)
        for name in list(self.hooks):
            if name not in keep:
                self.hooks.pop(name).remove()
        self.names = list(names)
        for name in names:
            p = params[name]
            p.requires_grad_(True)
            if self.in_backward and name not in self.hooks:
                self.hooks[name] = p.register_post_accumulate_grad_hook(functools.partial(self.grad_hook, name))

    def forget_hooks(self) -> None:
        """The parameters were replaced (their hooks went with them): hook the new ones at the next `set`."""
        self.hooks.clear()

    def grads(self) -> list[torch.Tensor]:
        """The gradients waiting for the step (what the non-finite check must see too)."""
        return [p.grad for p in (self.opt._params[n] for n in self.names) if p.grad is not None]

    def finite_flags(self) -> list[torch.Tensor]:
        """inactive_timing=backward: the flags of this step's backward (empty when none was checked)."""
        return list(self.finite.values())

    def reset_flags(self) -> None:
        self.finite = {}

    @torch.no_grad()
    def grad_hook(self, name: str, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook (inactive_timing=backward): in the last micro-batch's backward, take the
        step on the whole accumulated gradient and free it (earlier micro-batches leave it accumulating)."""
        if p.grad is not None and self.opt._at_boundary():
            self.step(name, p, guard=self.opt.config.skip_nonfinite)

    def _guard(self, g: torch.Tensor) -> None:
        """Zero `g` in place unless it and every inactive gradient before it in this backward are finite; the
        flag keeps the verdict on the device for `step()` (no host sync here)."""
        ok = self.finite.get(g.device)
        if ok is None:
            ok = torch.ones((), dtype=torch.bool, device=g.device)
        if g.numel():
            # The smallest and largest entries: NaN and inf propagate into them, nothing overflows (a min/max
            # pass costs a twentieth of torch's inf-norm on the CPU, the same on a GPU).
            lo, hi = torch.aminmax(g)
            ok = ok & lo.isfinite() & hi.isfinite()
        self.finite[g.device] = ok
        g.masked_fill_(~ok, 0)  # a zero update leaves the weight's bits as they are (nearest and stochastic)

    @torch.no_grad()
    def step(self, name: str, p: torch.Tensor, guard: bool = False) -> None:
        opt, cfg = self.opt, self.opt.config.inactive
        # The lr the step about to happen uses (LR schedulers move the outer groups after each step).
        lr = opt.param_groups[0 if name in opt._decay_names else 1]["lr"] * cfg.inactive_lr_scale
        g = p.grad
        p.grad = None
        if guard:
            self._guard(local_shard(g))
        g = g.sign_() if cfg.inactive_update == "signsgd" else g
        if cfg.inactive_rounding == "stochastic" and p.dtype == torch.bfloat16:
            # The step in fp32, rounded at random: an update below half a bf16 ulp survives in expectation.
            key = rounding_key(opt.config.schedule.seed, opt.global_step + 1, opt._index[name], INACTIVE_STREAM)
            stochastic_add_(local_shard(p), local_shard(g), -lr, key, start=global_start(p))
        else:
            p.add_(g, alpha=-lr)

    def apply_waiting(self) -> None:
        """Take the step on the waiting gradients (in `BlockOptimizer.step()`, once they are known finite)."""
        for name in self.names:
            p = self.opt._params[name]
            if p.grad is not None:
                self.step(name, p)

    def drop_grads(self) -> None:
        for name in self.names:
            self.opt._params[name].grad = None
