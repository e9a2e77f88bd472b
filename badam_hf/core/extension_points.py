"""How engines plug into `BlockOptimizer` (it knows none of them): registries of hooks and checks, and the
driver that may own the step. Every `register_*` and `attach_driver` returns a handle whose `remove()`
undoes it.

    BlockOptimizer.register_construction_check(fn): fn(model) runs first in every new BlockOptimizer,
        before the model is changed, and raises to refuse it.
    BlockOptimizer.register_init_hook(fn): fn(optimizer) runs at the end of every new BlockOptimizer.
    opt.register_switch_hook(fn): fn(optimizer) runs after every (re)activation of a block.
    opt.attach_driver(driver): an engine that owns the fp32 masters and drives the step (DeepSpeed ZeRO-3);
        `step()` then calls `driver.step(closure)`.
    opt.register_grad_keep_check(fn): fn() -> True while an engine reduces the parameters' gradients in the
        current backward (DDP's sync pass): the fp32 accumulation then hands the parameter its whole
        accumulated gradient, rounded once, instead of taking it.
    opt.register_flag_reduce(fn): fn(flag) all-reduces a one-element float tensor (max) over the ranks that
        train together, so every rank takes the same decision on a non-finite step.
    opt.register_boundary_check(fn): fn() -> True in the last micro-batch's backward before a step (read by
        BREAD's in-backward step, `inactive_timing=backward`).
    torch's own `register_step_pre_hook`, `register_state_dict_post_hook`,
        `register_load_state_dict_pre_hook` / `_post_hook` for engine state in checkpoints.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def _register(registry: OrderedDict, fn: Callable) -> RemovableHandle:
    handle = RemovableHandle(registry)
    registry[handle.id] = fn
    return handle


class ExtensionPoints:
    """The registries above, as a base class of `BlockOptimizer` (which calls `_init_extension_points`)."""

    # Class-wide: they run for every optimizer built while registered.
    _construction_checks: OrderedDict[int, Callable[[nn.Module], None]] = OrderedDict()
    _init_hooks: OrderedDict[int, Callable] = OrderedDict()

    def _init_extension_points(self) -> None:
        self._switch_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._grad_keep_checks: OrderedDict[int, Callable[[], bool]] = OrderedDict()
        self._boundary_checks: OrderedDict[int, Callable[[], bool]] = OrderedDict()
        self._flag_reducers: OrderedDict[int, Callable[[torch.Tensor], None]] = OrderedDict()
        self._driver = None  # see attach_driver

    @staticmethod
    def register_construction_check(fn: Callable[[nn.Module], None]) -> RemovableHandle:
        return _register(ExtensionPoints._construction_checks, fn)

    @staticmethod
    def register_init_hook(fn: Callable) -> RemovableHandle:
        return _register(ExtensionPoints._init_hooks, fn)

    def register_switch_hook(self, hook: Callable) -> RemovableHandle:
        return _register(self._switch_hooks, hook)

    def register_grad_keep_check(self, check: Callable[[], bool]) -> RemovableHandle:
        return _register(self._grad_keep_checks, check)

    def register_flag_reduce(self, fn: Callable[[torch.Tensor], None]) -> RemovableHandle:
        return _register(self._flag_reducers, fn)

    def register_boundary_check(self, check: Callable[[], bool]) -> RemovableHandle:
        """`check()` -> True during the backward of the last micro-batch before an optimizer step (HF's
        `accelerator.sync_gradients`). With `inactive_timing=backward` the inactive step is taken in that
        backward; in the earlier micro-batches the inactive gradients accumulate on the parameters. Without any
        check every backward counts as the last one (a loop without gradient accumulation); a plain loop with
        accumulation registers `lambda: (micro_batch + 1) % accumulation == 0`. Gradients still waiting at
        `step()` are applied there, after its non-finite check. The default `inactive_timing=step` needs no
        boundary (the step is taken in `step()`)."""
        return _register(self._boundary_checks, check)

    def attach_driver(self, driver) -> RemovableHandle:
        """Hand the step to an engine that owns the fp32 masters (DeepSpeed ZeRO-3): `step()` calls
        `driver.step(closure)`, no masters are made, and the current block is re-activated in that layout."""
        self._driver = driver
        self.restore_param_groups()
        self.seek(self.global_step)  # drops masters built before the engine existed
        return _DriverHandle(self, driver)

    @property
    def driver(self):
        """The engine driving the step (see `attach_driver`), or None."""
        return self._driver

    @property
    def switch_hooks(self) -> list[Callable]:
        return list(self._switch_hooks.values())

    # What the optimizer asks of them.

    def _run_switch_hooks(self) -> None:
        for hook in list(self._switch_hooks.values()):
            hook(self)

    def _engine_keeps_grads(self) -> bool:
        return any(check() for check in list(self._grad_keep_checks.values()))

    def _at_boundary(self) -> bool:
        checks = list(self._boundary_checks.values())
        return all(check() for check in checks) if checks else True

    def _reduce_flag(self, flag: torch.Tensor) -> None:
        for reduce in list(self._flag_reducers.values()):
            reduce(flag)


class _DriverHandle:
    def __init__(self, opt: ExtensionPoints, driver):
        self._opt, self._driver = opt, driver

    def remove(self) -> None:
        if self._opt._driver is self._driver:
            self._opt._driver = None

