"""`BlockOptimizer`: block-coordinate Adam (BAdam) as a `torch.optim.Optimizer`.

Only the active block (plus any always-active modules) requires grad. Its parameters are handed to an
inner optimizer (AdamW by default); for bf16 weights the inner optimizer sees fp32 master copies, so
fp32 master + moments exist for the active block only and are freed at every switch. The optimizer
switches block by itself after `switch_every` successful steps, so a plain PyTorch loop needs nothing
else:

    opt = BlockOptimizer(model, lr=1e-5, switch_every=100)
    loss.backward(); opt.step(); opt.zero_grad()

The same machinery runs the block family's other members (`mode`): `lisa` activates several sampled
blocks at once, `ratio` activates every block but gives the inner optimizer only the selected entries of
each parameter (masters and moments of those entries alone), and `inactive_update` adds BREAD's stateless
step for the frozen parameters, taken in `step()` after the non-finite check.
"""

from __future__ import annotations

import logging
import weakref
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .backward_truncation import BackwardTruncation
from .checkpoint import STATE_VERSION  # noqa: F401  (its home is checkpoint.py)
from .config import BAdamConfig
from .construction import (  # noqa: F401  (check_model, partition_for, schedule_for: imported from here too)
    build_inner_optimizer,
    check_model,
    hf_decay_parameter_names,
    partition_for,
    schedule_for,
)
from .errors import BAdamConfigError, ClosedOptimizerError
from .extension_points import ExtensionPoints
from .inactive_update import InactiveUpdate
from .masters import BlockMasters, local_shard
from .nonfinite import NonFiniteSteps
from .partition import Partition
from .rebinding import ParameterRebinding
from .selection import period_selections

logger = logging.getLogger("badam_hf")

# model -> weak reference to the BlockOptimizer that trains it now (see `close`). Weak both ways: the entry
# keeps neither the model nor the optimizer alive, and nothing is stored on the model (it deep-copies as before).
_LIVE: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def live_optimizer(model: nn.Module) -> "BlockOptimizer | None":
    """The BlockOptimizer built on `model` and not closed yet, if any."""
    ref = _LIVE.get(model)
    opt = ref() if ref is not None else None
    return None if opt is None or opt.closed else opt


class BlockOptimizer(ExtensionPoints, ParameterRebinding, NonFiniteSteps, torch.optim.Optimizer):
    """Block-coordinate optimizer over `model`'s parameters.

    The loop (K = `switch_every`; `step()` runs one iteration, `advance()` its last two lines):

        blocks = schedule.active_at(0); activate(blocks)   # only their parameters require grad
        for t = 1, 2, ...:
            loss.backward()                                # gradients of the active parameters, into fp32
            masters = fp32 copies of the active weights    # made at a block's first step, kept for its K steps
            inner.step(masters, grads)                     # AdamW by default: moments exist for the block only
            weights = round(masters)
            if t % K == 0:                                 # the block has had its K steps:
                drop the block's masters, moments and grads
                blocks = schedule.active_at(t); activate(blocks)

    Who holds what: `BlockMasters` (core/masters.py) the active block's fp32 masters and gradient buffer,
    `InactiveUpdate` (core/inactive_update.py) BREAD's step for the frozen parameters, the inner optimizer
    the moments. Engines plug in through `ExtensionPoints` (core/extension_points.py); parameters an engine
    replaces later are picked up by `ParameterRebinding` (core/rebinding.py); the checkpoint format is
    core/checkpoint.py.

    Args:
        model: the model to train (the unwrapped model; under DDP see `badam_hf.distributed.attach_ddp`).
        config: a `BAdamConfig`; or give its flat keys as keyword arguments (`switch_every=50`,
            `switch_mode="ascending"`, `granularity="attn_mlp"`, ...).
        lr, betas, eps, weight_decay: hyperparameters of the inner optimizer (betas/eps only if it takes
            them). Weight decay applies to the decay group only: no decay for biases and norm weights.
        inner_kwargs: extra keyword arguments for the inner optimizer (`momentum=0.9` for SGD, ...).
        decay_parameter_names: names that get weight decay; default: HF Trainer's rule.
        partition: a precomputed `Partition` (default: `partition_model(model, config.partition)`).
    """

    def __init__(self, model: nn.Module, config: BAdamConfig | None = None, *, lr: float = 1e-5,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 inner_kwargs: dict[str, Any] | None = None, decay_parameter_names=None,
                 partition: Partition | None = None, **config_kwargs):
        if config is not None and config_kwargs:
            raise BAdamConfigError("give either config=BAdamConfig(...) or flat keyword arguments, not both.")
        config = config if config is not None else BAdamConfig.from_flat(config_kwargs, source="BlockOptimizer")
        for check in list(self._construction_checks.values()):
            check(model)  # engines refuse what they cannot train, before anything changes
        check_model(model)
        self.model, self.config, self.mode = model, config, config.mode
        self.partition = partition if partition is not None else partition_for(model, config)
        self.schedule = schedule_for(self.partition, config)
        # Nothing refused this one: it takes over from one still training the model (a second training stage,
        # SFT then DPO; a notebook's second Trainer), whose hooks would keep cutting the backward and taking
        # the gradients, and whose state would stay alive.
        previous = live_optimizer(model)
        if previous is not None:
            logger.info("badam_hf: closing the BlockOptimizer already training this model (step %d, block %r); "
                        "a new one takes over.", previous.global_step, previous.active_block_name)
            previous.close()
        self.closed = False
        # What close() puts back: which parameters required grad before BAdam froze them.
        self._requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
        self._params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self._names: list[str] = list(self._params)
        self._index = {n: i for i, n in enumerate(self._names)}
        decay = hf_decay_parameter_names(model) if decay_parameter_names is None else set(decay_parameter_names)
        self._decay_names = decay
        self._init_counters()
        self._init_block_state()
        self._init_extension_points()
        for p in self._params.values():  # everything frozen; _activate unfreezes the active block
            p.requires_grad_(False)
            p.grad = None
        hyper = {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps}
        self.inner = build_inner_optimizer(model, config.inner_optimizer_cls, hyper, inner_kwargs)
        self.truncation = BackwardTruncation(model, self.partition, enabled=config.truncate_backward)
        outer_groups = [{k: v for k, v in g.items() if k != "params"} | {"params": []} for g in self.inner.param_groups]
        super().__init__(outer_groups, dict(self.inner.defaults))
        self._group_dicts = tuple(self.param_groups)  # an engine may drop empty groups (DeepSpeed does)
        self._init_rebinding()  # an engine may replace the parameters after this: looked for at the first step
        self._activate(self.active_blocks, fresh=True)
        _LIVE[model] = weakref.ref(self)
        for hook in list(self._init_hooks.values()):
            hook(self)

    @torch.no_grad()
    def close(self) -> None:
        """Undo what this optimizer did to the model and free its state; idempotent. Removed: the backward
        truncation's forward hooks (HF's input-require-grads hooks it took away come back), the fp32-gradient
        and inactive-update gradient hooks on the parameters, the engines' switch hooks, checks and driver.
        Freed: masters, moments, the fp32 gradient buffer and every gradient on the parameters. Each parameter
        requires grad again as it did before the optimizer was built. Layers compiled by `--torch_compile`
        stay compiled (that is the model's, and a later run reuses it). Building a new BlockOptimizer on the
        same model closes this one; the Trainer's end of training does not (`train()` may be called again).
        Stepping a closed optimizer raises `ClosedOptimizerError`."""
        if self.closed:
            return
        self.closed = True
        masters = self._block_masters
        self._drop_state_of(list(dict.fromkeys([*self._trainable, *masters.masters, *masters.grad_hooks])))
        masters.buffers = []
        self.inner.state.clear()
        self._inactive.set([])
        self.truncation.remove()
        for registry in (self._switch_hooks, self._grad_keep_checks, self._boundary_checks, self._flag_reducers):
            registry.clear()
        self._driver = None
        self._trainable, self._selections = [], {}
        for groups in (self.param_groups, self.inner.param_groups):
            for group in groups:
                group["params"][:] = []
        for name, p in self._params.items():
            p.grad = None
            p.requires_grad_(self._requires_grad_before.get(name, True))
        if _LIVE.get(self.model) is not None and _LIVE[self.model]() is self:
            del _LIVE[self.model]

    def _check_open(self) -> None:
        if self.closed:
            raise ClosedOptimizerError(
                "this BlockOptimizer was closed (a newer BlockOptimizer was built on the same model, which closes "
                "the one before it); step the newer one, or build a new optimizer for this model."
            )

    # --- the algorithm: step, advance, activate -------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        self._check_open()
        if self._driver is not None:
            return self._driver.step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._attach_master_grads()
        self.sync_hyperparameters()
        self._block_masters.take_param_grads()
        finite = not self.config.skip_nonfinite or self.grads_finite()
        self._inactive.reset_flags()  # read: the next backward starts a new verdict
        if not finite:
            self._skip_step()
            return loss
        self._inactive.apply_waiting()
        self.inner.step()
        self.note_step(skipped=False)
        self._write_back()
        self.advance()
        return loss

    def advance(self) -> None:
        """Count one successful optimizer step; activate the next block when this one has had its K steps."""
        self.global_step += 1
        if self.schedule.switches_at(self.global_step):
            self._activate(self.schedule.active_at(self.global_step))

    def _activate(self, blocks: tuple[int, ...], fresh: bool = False) -> None:
        self._check_open()  # the one path that (re)installs hooks on the model
        blocks = tuple(blocks)
        always = set(self.partition.always_active)
        new = [n for b in blocks for n in self.partition.blocks[b].param_names] + list(self.partition.always_active)
        new_set = set(new)
        # Always-active parameters keep their master and moments across switches. Everything else starts
        # afresh, also a block drawn again (mode lisa) or one whose mask moved (mode ratio): its old moments
        # belong to other coordinates or to a stale point.
        self._drop_state_of([n for n in self._trainable if fresh or n not in always or n not in new_set])
        for name in self._trainable:
            if name not in new_set:
                self._params[name].requires_grad_(False)
                self._params[name].grad = None
        self._trainable = new
        self._selections = self._ratio_selections(new) if self.mode == "ratio" else {}
        for name in new:
            self._params[name].requires_grad_(True)
        self._block_masters.hook_grads(new)
        self._fill_param_groups()
        self.active_blocks, self.active_block = blocks, blocks[0]
        self._inactive.follow(new)
        self.truncation.update(new + self._inactive.names)
        self._run_switch_hooks()

    def _drop_state_of(self, names: list[str]) -> None:
        """The one teardown of a block's state, which every path uses (a switch, an engine's rebuild, new
        parameters): the moments of `names`, their fp32 masters and gradient hooks, the fp32 gradient buffer."""
        for name in names:
            self.inner.state.pop(self._inner_tensor(name), None)
        self._block_masters.drop(names)

    def _write_back(self, skipped: bool = False) -> None:
        """After the inner step: the fp32 gradients dropped, then the weights from the masters. After a skipped
        step the masters are unchanged: held split, they go back to being split (the weights keep their bits),
        except at a block's (or training's) last step, which writes them back with `switch_rounding` as a step
        taken there would have."""
        done = self.global_step + 1
        final = self.total_steps is not None and done == self.total_steps
        block_ends = self.schedule.switches_at(done)
        if skipped and not (block_ends or final):
            self._block_masters.drop_grads(split=True)
            return
        self._block_masters.drop_grads()  # freed before the split's temporaries are made
        self._block_masters.store(block_ends=block_ends, final=final, step=done)
        if final:
            self._finished_at = done

    @torch.no_grad()
    def _skip_step(self) -> None:
        """Drop this step's gradients; weights, masters and moments stay as they were (see `_write_back`). A
        skipped step still counts towards K."""
        self._write_back(skipped=True)
        for name in self._trainable + self._inactive.names:
            self._params[name].grad = None
        self.note_step(skipped=True)
        self.advance()

    def seek(self, step: int) -> None:
        """Jump the schedule to `step` optimizer steps done, with fresh state for the block active there."""
        self.global_step = int(step)
        self._activate(self.schedule.active_at(self.global_step), fresh=True)

    def finish(self) -> None:
        """End of training: with stochastic switch rounding (`auto`, `stochastic`), write the masters still alive (the current
        block's, the always-active ones') into the weights as a block's last step does. Nothing to do with
        nearest, or when the last step was `total_steps` (it did this already). Training may go on after it:
        the masters stay whole and exact. The Trainer callback calls it at the end of `train()`."""
        if (not self.config.stochastic_switch or self._driver is not None
                or self._finished_at == self.global_step or not self._block_masters.buffers):
            return
        self._block_masters.join()
        self._block_masters.store(final=True, step=self.global_step)
        self._finished_at = self.global_step

    # --- the state behind the loop --------------------------------------------------------------------

    def _init_counters(self) -> None:
        self.global_step = 0
        self.skipped_steps = 0  # steps skipped for inf/NaN gradients (all of them; see skip_nonfinite)
        self._skips_in_a_row = 0
        self.loaded_step: int | None = None  # the step of the last state loaded (resume checks compare it)
        # The step count at which training ends (the Trainer's max_steps; see `finish`): that step drops every
        # master, so switch_rounding applies to all of them there. None: unknown.
        self.total_steps: int | None = None
        self._finished_at: int | None = None  # the step whose write-back was the final one
        self.active_blocks: tuple[int, ...] = self.schedule.active_at(0)
        self.active_block: int = self.active_blocks[0]

    def _init_block_state(self) -> None:
        """The active block's state, empty until `_activate` fills it."""
        self._trainable: list[str] = []  # names the inner optimizer trains now (the blocks + always-active)
        self._selections: dict[str, Any] = {}  # mode ratio: name -> the entries trained this period
        self._block_masters = BlockMasters(self)  # fp32 masters, gradient buffer and hooks of the active block
        self._inactive = InactiveUpdate(self)  # inactive_update: BREAD's step for the other parameters

    def _ratio_selections(self, names: list[str]) -> dict[str, Any]:
        """Mode ratio: the entries each block parameter trains in the current period (always-active ones train
        whole). A pure function of (seed, period, parameter index): ranks and resumed runs agree."""
        always, cfg = set(self.partition.always_active), self.config.ratio
        return period_selections({n: self._params[n] for n in names if n not in always}, self._index,
                                 cfg.update_ratio, cfg.mask_mode, self.config.schedule.seed,
                                 self.schedule.period(self.global_step))

    def _fill_param_groups(self) -> None:
        # Keep the two group dicts (and their list objects): LR schedulers hold on to them.
        for gi in range(2):
            names = self._group_names(gi)
            self.param_groups[gi]["params"][:] = [self._params[n] for n in names]
            self.inner.param_groups[gi]["params"][:] = [self._inner_tensor(n) for n in names]

    def _group_names(self, gi: int) -> list[str]:
        """Names in param group `gi` (0: weight decay, 1: none), in their order there."""
        return [n for n in self._trainable if (n in self._decay_names) == (gi == 0)]

    def _inner_tensor(self, name: str) -> torch.Tensor:
        """What the inner optimizer updates for `name`: its fp32 master, or the parameter itself."""
        return self._block_masters.masters.get(name, self._params[name])

    def _materialize_masters(self) -> None:
        """Make the fp32 masters that the active parameters lack, as views of one buffer (one allocation,
        freed whole at the next switch). Deferred to the block's first step: until then a master would only
        repeat the weights, so the forward and backward of a block's first step (every step at K=1) run
        without one."""
        if self._block_masters.materialize():
            self._fill_param_groups()

    def _attach_master_grads(self) -> None:
        """Masters made, and the fp32 gradients accumulated so far hung on them (what the step and clipping use)."""
        self._materialize_masters()
        self._block_masters.attach_grads()

    # --- gradients wherever they live: clipping, zeroing ----------------------------------------------

    def gradient_holders(self, parameters) -> list[torch.Tensor]:
        """`parameters` (e.g. `model.parameters()`), with each one whose gradient now lives on its fp32 master
        replaced by that master: what gradient clipping must see (HF's Trainer clips through this)."""
        self._attach_master_grads()
        names = {id(p): n for n, p in self._params.items()}
        out = []
        for p in parameters:
            master = self._block_masters.masters.get(names.get(id(p)))
            out.append(master if p.grad is None and master is not None and master.grad is not None else p)
        return out

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, parameters=None) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` over the trained gradients wherever they live (for plain loops;
        clipping `model.parameters()` directly would miss the gradients already moved to fp32)."""
        params = self.model.parameters() if parameters is None else parameters
        return torch.nn.utils.clip_grad_norm_(self.gradient_holders(params), max_norm, norm_type)

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._inactive.drop_grads()  # not in the param groups: dropped like the trained ones
        self._block_masters.zero_grads(set_to_none)

    # --- for engines ----------------------------------------------------------------------------------

    def restore_param_groups(self) -> None:
        """Put back the two (decay / no decay) group dicts, e.g. after an engine dropped the empty ones."""
        self.param_groups[:] = list(self._group_dicts)

    def clear_block_state(self) -> None:
        """Drop the inner optimizer's state and the fp32 masters (an engine rebuilding its own layout)."""
        self._drop_state_of(self._trainable)
        self.inner.state.clear()  # a driving engine keys the inner state by tensors of its own
        self._inactive.set([])

    def sync_hyperparameters(self) -> None:
        """Copy lr, betas, ... from the outer groups (which LR schedulers change) into the inner optimizer's."""
        for outer, inner in zip(self.param_groups, self.inner.param_groups):
            for k, v in outer.items():
                if k != "params" and k in inner:
                    inner[k] = v

    # --- introspection --------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.partition)

    @property
    def active_block_name(self) -> str:
        """The active block's name (mode lisa: the sampled blocks' names joined by '+'; mode ratio: 'all')."""
        return self.blocks_name(self.active_blocks)

    def blocks_name(self, blocks) -> str:
        if self.mode == "ratio":
            return "all"
        return "+".join(self.partition.blocks[b].name for b in blocks)

    @property
    def inactive_names(self) -> list[str]:
        """Names that take `inactive_update`'s stateless step in the current block (empty without it)."""
        return list(self._inactive.names)

    @property
    def selections(self) -> MappingProxyType:
        """Mode ratio: name -> the entries of its flattened (local) tensor trained in this period (a slice or
        an index tensor); always-active names are absent (they train whole)."""
        return MappingProxyType(self._selections)

    @property
    def trainable_names(self) -> list[str]:
        return list(self._trainable)

    @property
    def params_by_name(self) -> MappingProxyType:
        """Name -> the model parameter this optimizer trains (read-only view)."""
        return MappingProxyType(self._params)

    @property
    def masters(self) -> MappingProxyType:
        """Name -> fp32 master of an active low-precision (or sharded) parameter (read-only view). Made at the
        block's first step (before it, a master would only repeat the weights: it is their exact upcast).
        Reading this between steps rebuilds masters held split (`split_masters`) until the next step."""
        self._block_masters.join()
        return MappingProxyType(self._block_masters.masters)

    @property
    def master_grads(self) -> dict[str, torch.Tensor]:
        """Name -> the fp32 gradient accumulated so far for an active low-precision parameter."""
        return self._block_masters.grads()

    @property
    def steps_in_block(self) -> int:
        return self.schedule.position(self.global_step)[2]

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held for the active block: fp32 masters, inner-optimizer state, and grads."""
        state = sum(
            v.numel() * v.element_size()
            for st in self.inner.state.values()
            for v in st.values()
            if torch.is_tensor(v)
        )
        # fp32 gradients live in one buffer (see BlockMasters.grad_slot); what is still on the parameters comes
        # on top.
        grads = sum(local_shard(p.grad).numel() * p.grad.element_size() for p in self._params.values()
                    if p.grad is not None) + self._block_masters.grad_nbytes()
        # Mode ratio, mask_mode scatter: the index tensors of the selected entries (4 bytes per entry).
        selections = sum(s.numel() * s.element_size() for s in self._selections.values() if torch.is_tensor(s))
        return {"masters": self._block_masters.nbytes(), "optimizer_state": state, "grads": grads,
                "selections": selections}

    # --- checkpointing --------------------------------------------------------------------------------

    # torch's state-dict hooks run as in torch.optim.Optimizer (engines add their state through them).

    def state_dict(self) -> dict[str, Any]:
        """Plain containers and tensors only, so `torch.load(weights_only=True)` reads it (the format:
        `badam_hf.core.checkpoint`)."""
        self._check_open()
        self._rebind_if_not_stepped()
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        out = checkpoint.state_dict(self)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, out)
            if result is not None:
                out = result
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from `state_dict`, after checking that it belongs to this run (see `check_state_dict`)."""
        self._check_open()
        self._rebind_if_not_stepped()
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        checkpoint.load_state_dict(self, state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def check_state_dict(self, state_dict: dict[str, Any]) -> int:
        """Refuse a checkpoint that does not belong to this run, or of another format version (raises
        CheckpointMismatchError); returns the step it resumes at. Changes nothing."""
        return checkpoint.check_state_dict(self, state_dict)


def unwrap_optimizer(optimizer) -> BlockOptimizer | None:
    """The BlockOptimizer inside accelerate's AcceleratedOptimizer (or any `.optimizer` wrapper)."""
    for _ in range(5):
        if optimizer is None or isinstance(optimizer, BlockOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None
