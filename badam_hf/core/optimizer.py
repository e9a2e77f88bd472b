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
step for the frozen parameters inside the backward.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections import OrderedDict
from types import MappingProxyType
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import checkpoint
from .backward_truncation import BackwardTruncation
from .checkpoint import STATE_VERSION  # noqa: F401  (its home is checkpoint.py)
from .config import BAdamConfig
from .errors import BAdamConfigError, NonFiniteGradientError
from .masters import (
    MasterBuffer,
    flat_like,
    grads_to_masters,
    is_sharded,
    local_shard,
    needs_master,
    selected,
    write_selected,
)
from .partition import Partition, partition_model
from .rounding import INACTIVE_STREAM, SWITCH_STREAM, global_start, rounding_key, stochastic_add_, store_stochastic
from .schedule import BlockSchedule
from .selection import GatheredMasters, local_range, localize, select_entries, selection_template

logger = logging.getLogger("badam_hf")


def _fused_supported(model: nn.Module, inner_cls: type) -> bool:
    """Whether torch's fused Adam/AdamW kernel runs where this model lives (CPU and CUDA in torch 2.13)."""
    if not issubclass(inner_cls, (torch.optim.Adam, torch.optim.AdamW)):
        return False
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a torch without the helper: the two devices fused Adam has long supported
        devices = {"cpu", "cuda"}
    return all(p.device.type in devices for p in model.parameters())


def hf_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names that get weight decay under HF Trainer's rule (no decay for biases and norm weights)."""
    from transformers import Trainer

    # The method reads nothing from the Trainer instance; calling it keeps us on HF's exact, current rule.
    return set(Trainer.get_decay_parameter_names(None, model))


def check_model(model: nn.Module) -> None:
    """Refuse models BAdam cannot train correctly, before anything changes."""
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft is a dependency, but keep the check usable without it
        PeftModel = BaseTunerLayer = ()
    # Wrapped (PeftModel), unwrapped (get_base_model() still holds the LoRA layers) or added through
    # transformers' add_adapter / load_adapter: BAdam would train the base weights and the adapter matrices
    # together, and save `base_layer` / `lora_A` keys that plain from_pretrained cannot load.
    tuner = next((n for n, m in model.named_modules() if n and (
                  (BaseTunerLayer and isinstance(m, BaseTunerLayer)) or type(m).__module__.startswith("peft."))), None)
    if (PeftModel and isinstance(model, PeftModel)) or tuner is not None or getattr(model, "_hf_peft_config_loaded", False):
        where = f" (e.g. {tuner!r})" if tuner else ""
        raise BAdamConfigError(
            f"the model holds PEFT adapter layers{where}; BAdam trains a model's own full weights block by block, "
            "and would train the adapter matrices along with them. Either merge the adapters into the weights "
            "first and full-fine-tune the merged model with BAdam: `model = peft_model.merge_and_unload()` (on the "
            "PeftModel; for adapters added with transformers' load_adapter, load them with "
            "`PeftModel.from_pretrained(base_model, adapter_path)` and merge that), or train the adapters alone "
            "with plain LoRA training, without BAdam (e.g. --optim adamw_torch)."
        )
    fp16 = [n for n, p in model.named_parameters() if p.dtype == torch.float16]
    if fp16:
        raise BAdamConfigError(
            f"the model has float16 weights ({fp16[0]!r}, ...); BAdam supports bfloat16 weights (load with "
            "torch_dtype=torch.bfloat16, the paper's setting) or float32 weights (optionally with fp16 autocast "
            "and loss scaling)."
        )


def partition_for(model: nn.Module, config: BAdamConfig) -> Partition:
    """The blocks of `model` under `config` (mode lisa: everything outside the blocks is always active unless
    `always_active` is set)."""
    return partition_model(model, config.partition, outside_blocks_active=config.mode == "lisa")


def schedule_for(partition: Partition, config: BAdamConfig) -> BlockSchedule:
    """The schedule of `config` over `partition` (refuses lisa_layers above the number of blocks)."""
    return BlockSchedule(
        len(partition), config.schedule,
        sample_size=config.lisa.lisa_layers if config.mode == "lisa" else None,
        every_block=config.mode == "ratio",
    )


def build_inner_optimizer(model: nn.Module, inner_cls: type, hyper: dict[str, Any],
                          inner_kwargs: dict[str, Any] | None) -> torch.optim.Optimizer:
    """The inner optimizer, built once over two (decay, no decay) groups whose `params` lists change in place
    at each switch. `hyper` (lr, weight_decay, betas, eps) is passed where `inner_cls` takes it."""
    accepted = inspect.signature(inner_cls.__init__).parameters
    inner_defaults = {k: v for k, v in hyper.items() if k in accepted}
    inner_defaults.update(inner_kwargs or {})
    if "fused" in accepted and not {"fused", "foreach"} & set(inner_defaults) and _fused_supported(model, inner_cls):
        # Measured on CPU (torch 2.13, one layer's tensors): fused 4x faster than the per-tensor loop and
        # than foreach, and no whole-block temporaries (foreach's sqrt makes one).
        inner_defaults["fused"] = True
    # Explicit per-group weight decay: a base optimizer's default (AdamW: 0.01) must never override it.
    inner_groups = [{"params": []}, {"params": []}]
    if "weight_decay" in accepted:
        inner_groups[0]["weight_decay"], inner_groups[1]["weight_decay"] = hyper["weight_decay"], 0.0
    return inner_cls(inner_groups, **inner_defaults)


class BlockOptimizer(torch.optim.Optimizer):
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

    Args:
        model: the model to train (the unwrapped model; under DDP see `badam_hf.distributed.attach_ddp`).
        config: a `BAdamConfig`; or give its flat keys as keyword arguments (`switch_every=50`,
            `switch_mode="ascending"`, `granularity="attn_mlp"`, ...).
        lr, betas, eps, weight_decay: hyperparameters of the inner optimizer (betas/eps only if it takes
            them). Weight decay applies to the decay group only: no decay for biases and norm weights.
        inner_kwargs: extra keyword arguments for the inner optimizer (`momentum=0.9` for SGD, ...).
        decay_parameter_names: names that get weight decay; default: HF Trainer's rule.
        partition: a precomputed `Partition` (default: `partition_model(model, config.partition)`).

    Extension points (how engines plug in; this class knows none of them), each returning a handle whose
    `remove()` undoes it:
        BlockOptimizer.register_construction_check(fn): fn(model) runs first in every new BlockOptimizer,
            before the model is changed, and raises to refuse it.
        BlockOptimizer.register_init_hook(fn): fn(optimizer) runs at the end of every new BlockOptimizer.
        opt.register_switch_hook(fn): fn(optimizer) runs after every (re)activation of a block.
        opt.attach_driver(driver): an engine that owns the fp32 masters and drives the step (DeepSpeed
            ZeRO-3); `step()` then calls `driver.step(closure)`.
        opt.register_grad_keep_check(fn): fn() -> True while an engine reduces the parameters' gradients in
            the current backward (DDP's sync pass): the fp32 accumulation then hands the parameter its whole
            accumulated gradient, rounded once, instead of taking it.
        opt.register_flag_reduce(fn): fn(flag) all-reduces a one-element float tensor (max) over the ranks
            that train together, so every rank takes the same decision on a non-finite step.
        torch's own `register_step_pre_hook`, `register_state_dict_post_hook`,
            `register_load_state_dict_pre_hook` / `_post_hook` for engine state in checkpoints.
    """

    _construction_checks: OrderedDict[int, Callable[[nn.Module], None]] = OrderedDict()
    _init_hooks: OrderedDict[int, Callable[["BlockOptimizer"], None]] = OrderedDict()

    def __init__(
        self,
        model: nn.Module,
        config: BAdamConfig | None = None,
        *,
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        inner_kwargs: dict[str, Any] | None = None,
        decay_parameter_names=None,
        partition: Partition | None = None,
        **config_kwargs,
    ):
        if config is not None and config_kwargs:
            raise BAdamConfigError("give either config=BAdamConfig(...) or flat keyword arguments, not both.")
        config = config if config is not None else BAdamConfig.from_flat(config_kwargs, source="BlockOptimizer")
        for check in list(BlockOptimizer._construction_checks.values()):
            check(model)  # engines refuse what they cannot train, before anything changes
        check_model(model)
        self.model = model
        self.config = config
        self.mode = config.mode
        self.partition = partition if partition is not None else partition_for(model, config)
        self.schedule = schedule_for(self.partition, config)

        self._params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self._names: list[str] = list(self._params)
        self._index = {n: i for i, n in enumerate(self._names)}
        decay = hf_decay_parameter_names(model) if decay_parameter_names is None else set(decay_parameter_names)
        self._decay_names = decay
        self._init_block_state()
        self._init_extension_points()
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

        # Freeze everything; _activate unfreezes the active block.
        for p in self._params.values():
            p.requires_grad_(False)
            p.grad = None

        hyper = {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps}
        self.inner = build_inner_optimizer(model, config.inner_optimizer_cls, hyper, inner_kwargs)

        self.truncation = BackwardTruncation(model, self.partition, enabled=config.truncate_backward)
        outer_groups = [{k: v for k, v in g.items() if k != "params"} | {"params": []} for g in self.inner.param_groups]
        super().__init__(outer_groups, dict(self.inner.defaults))
        self._group_dicts = tuple(self.param_groups)  # an engine may drop empty groups (DeepSpeed does)
        # An engine may replace the parameters after the optimizer is built (accelerate shards the model with
        # FSDP2 after the Trainer built the optimizer): look once, at the first step. (A step pre-hook cannot
        # remove itself while torch iterates over the hooks, so it stays and returns at once afterwards.)
        self._has_stepped = False
        self.register_step_pre_hook(lambda opt, args, kwargs: self._first_step_pre_hook())
        self._activate(self.active_blocks, fresh=True)
        for hook in list(BlockOptimizer._init_hooks.values()):
            hook(self)

    # --- the algorithm: step, advance, activate -------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        if self._driver is not None:
            return self._driver.step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._attach_master_grads()
        names = [n for n in self._trainable if n in self._masters]
        params = [self._params[n] for n in names]
        masters = [self._masters[n] for n in names]
        self.sync_hyperparameters()
        # Gradients still on the parameters (bf16 accumulation, or what an engine reduced) join the fp32 ones.
        if any(p.grad is not None for p in params):
            grads_to_masters(params, masters, [self._fp32_grad_slot(n) for n in names],
                             [self._selections.get(n) for n in names])
        if self.config.skip_nonfinite and not self.grads_finite():
            self._skip_step()
            return loss
        self._apply_waiting_inactive()
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
            if name not in self._grad_hooks and self._accumulates_in_fp32(name):
                self._grad_hooks[name] = self._params[name].register_post_accumulate_grad_hook(
                    functools.partial(self._accumulate_fp32_grad, name)
                )
        self._fill_param_groups()
        self.active_blocks = blocks
        self.active_block = blocks[0]
        self._set_inactive(self._inactive_scope(new) if self.config.inactive.enabled else [])
        self.truncation.update(new + self._inactive_names)
        for hook in list(self._switch_hooks.values()):
            hook(self)

    def _init_block_state(self) -> None:
        """The active block's state, empty until `_activate` fills it."""
        self._trainable: list[str] = []  # names the inner optimizer trains now (the blocks + always-active)
        self._masters: dict[str, torch.Tensor] = {}
        self._master_buffers: list[MasterBuffer] = []  # who owns the masters' memory (one per block / side)
        self._grad_hooks: dict[str, RemovableHandle] = {}
        self._fp32_grads: dict[str, torch.Tensor] | None = None  # name -> fp32 gradient view, one buffer
        self._buffered_grads: set[str] = set()  # names whose fp32 gradient sits in the buffer, not yet on a master
        self._selections: dict[str, Any] = {}  # mode ratio: name -> the entries trained this period
        self._inactive_names: list[str] = []  # inactive_update: frozen-for-Adam names that take BREAD's step
        self._inactive_hooks: dict[str, RemovableHandle] = {}

    def _drop_state_of(self, names: list[str]) -> None:
        """The one teardown of a block's state, which every path uses (a switch, an engine's rebuild, new
        parameters): the moments, fp32 masters and fp32-gradient hooks of `names`, and the block's fp32
        gradient buffer."""
        for name in names:
            self.inner.state.pop(self._inner_tensor(name), None)
            self._masters.pop(name, None)
            self._drop_grad_hook(name)
        self._master_buffers = [b for b in self._master_buffers if all(n in self._masters for n in b.names)]
        self._drop_fp32_grads()

    def seek(self, step: int) -> None:
        """Jump the schedule to `step` optimizer steps done, with fresh state for the block active there."""
        self.global_step = int(step)
        self._activate(self.schedule.active_at(self.global_step), fresh=True)

    def _ratio_selections(self, names: list[str]) -> dict[str, Any]:
        """Mode ratio: the entries each block parameter trains in the current period (always-active ones train
        whole). A pure function of (seed, period, parameter index): ranks and resumed runs agree."""
        cfg, always = self.config.ratio, set(self.partition.always_active)
        period = self.schedule.period(self.global_step)
        out = {}
        for name in names:
            if name in always:
                continue
            # Drawn over the whole tensor, then cut to this rank's shard (FSDP2): the masks do not depend on
            # the number of ranks, and a sharded run trains the entries one process would.
            p = self._params[name].detach()
            start, count = local_range(p)
            whole = select_entries(p.numel(), cfg.update_ratio, cfg.mask_mode, self.config.schedule.seed,
                                   period, self._index[name], device=local_shard(p).device)
            out[name] = localize(whole, start, count, p.numel())
        return out

    def _fill_param_groups(self) -> None:
        # Keep the two group dicts (and their list objects): LR schedulers hold on to them.
        for gi in range(2):
            names = self._group_names(gi)
            self.param_groups[gi]["params"][:] = [self._params[n] for n in names]
            self.inner.param_groups[gi]["params"][:] = [self._inner_tensor(n) for n in names]

    def _inner_tensor(self, name: str) -> torch.Tensor:
        """What the inner optimizer updates for `name`: its fp32 master, or the parameter itself."""
        return self._masters.get(name, self._params[name])

    # --- fp32 masters of the active low-precision parameters ------------------------------------------

    def _needs_master(self, name: str) -> bool:
        # Mode ratio: the selected entries always get a plain fp32 copy (the inner optimizer's tensors).
        return self._driver is None and (name in self._selections or needs_master(self._params[name]))

    def _materialize_masters(self) -> None:
        """Make the fp32 masters that the active parameters lack, as views of one buffer (one allocation,
        freed whole at the next switch). Deferred to the block's first step: until then a master would only
        repeat the weights, so the forward and backward of a block's first step (every step at K=1) run
        without one."""
        missing = [n for n in self._trainable if n not in self._masters and self._needs_master(n)]
        if missing:
            # The always-active parameters' masters outlive the block's: a buffer of their own.
            always = set(self.partition.always_active)
            gathered = [n for n in missing if torch.is_tensor(self._selections.get(n))]
            rest = [n for n in missing if n not in always and n not in set(gathered)]
            for group in ([n for n in missing if n in always], rest):
                if group:
                    # A slice selection (mode ratio, adjacent) is a view of the weights: held like a weight.
                    buf = MasterBuffer(group, [selected(self._params[n], self._selections.get(n)) for n in group])
                    self._master_buffers.append(buf)
                    self._masters.update(zip(group, buf.masters))
            if gathered:
                buf = GatheredMasters(gathered, [self._params[n] for n in gathered],
                                      [self._selections[n] for n in gathered])
                self._master_buffers.append(buf)
                self._masters.update(zip(gathered, buf.masters))
            self._fill_param_groups()
        for buf in self._master_buffers:
            buf.join()

    def _attach_master_grads(self) -> None:
        """Masters made, and the fp32 gradients accumulated so far hung on them (what the step and clipping use)."""
        self._materialize_masters()
        for name in self._buffered_grads:
            master = self._masters[name]
            if master.grad is None:
                master.grad = self._fp32_grads[name]
        self._buffered_grads.clear()

    def _write_back(self) -> None:
        """After the inner step: the master gradients dropped, then the weights from the masters."""
        for buf in self._master_buffers:
            for m in buf.masters:
                m.grad = None
        self._drop_fp32_grads()  # freed before the split's temporaries are made
        done = self.global_step + 1
        final = self.total_steps is not None and done == self.total_steps
        self._store_masters(block_ends=self.schedule.switches_at(done), final=final, step=done)
        if final:
            self._finished_at = done

    def _store_masters(self, block_ends: bool = False, final: bool = False, step: int | None = None) -> None:
        """Write the masters (rounded) into the weights. With `split_masters`, a bf16 buffer keeps only the
        masters' low 16 bits until the next step, except at the block's last step (`block_ends`): the
        block's masters are dropped right after it, so they are written with `switch_rounding` instead
        (nearest: torch's rounding). At the last step of training (`final`) every master is written that way
        under stochastic rounding (nearest keeps today's behaviour bit for bit). `step`: the steps done once
        this write lands (the key of the stochastic rounding)."""
        always = set(self.partition.always_active)
        stochastic = self.config.stochastic_switch
        for buf in self._master_buffers:
            lives_on = not (final and stochastic) and (not block_ends or buf.names[0] in always)
            if self.config.split_masters and buf.can_split and lives_on:
                buf.split()
            elif stochastic and not lives_on:
                self._store_stochastic(buf, step)
            else:
                buf.store()

    def _store_stochastic(self, buf, step: int) -> None:
        """Write `buf`'s masters into their weights for the last time, rounded stochastically; the noise is a
        pure function of (seed, step, parameter index, position in the whole tensor)."""
        seed = self.config.schedule.seed
        for name, master in zip(buf.names, buf.masters):
            key = rounding_key(seed, step, self._index[name], SWITCH_STREAM)
            store_stochastic(self._params[name], master, self._selections.get(name), key)
            master.grad = None

    def finish(self) -> None:
        """End of training: with `switch_rounding=stochastic`, write the masters still alive (the current
        block's, the always-active ones') into the weights as a block's last step does. Nothing to do with
        nearest, or when the last step was `total_steps` (it did this already). Training may go on after it:
        the masters stay whole and exact. The Trainer callback calls it at the end of `train()`."""
        if (not self.config.stochastic_switch or self._driver is not None
                or self._finished_at == self.global_step or not self._master_buffers):
            return
        for buf in self._master_buffers:
            buf.join()
        self._store_masters(final=True, step=self.global_step)
        self._finished_at = self.global_step

    def _master_value(self, name: str) -> torch.Tensor:
        """The fp32 master of `name` as a tensor with memory (a rebuilt copy while its buffer is split)."""
        for buf in self._master_buffers:
            if name in buf.names:
                return buf.value(buf.names.index(name))
        return self._masters[name]

    # --- gradients straight into fp32 -----------------------------------------------------------------

    def _accumulates_in_fp32(self, name: str) -> bool:
        # Sharded parameters (FSDP2) get their reduced gradient assigned by the engine, not accumulated by
        # autograd; a driving engine (ZeRO-3) owns the gradients. Both keep their own path.
        return self.config.fp32_grad_accumulation and self._needs_master(name) and not is_sharded(self._params[name])

    def _drop_grad_hook(self, name: str) -> None:
        handle = self._grad_hooks.pop(name, None)
        if handle is not None:
            handle.remove()

    def _fp32_grad_slot(self, name: str) -> torch.Tensor:
        """The fp32 gradient view of `name`'s master: all of them live in one buffer, made at the first
        gradient after a step and freed at the next step."""
        if self._fp32_grads is None:
            names = [n for n in self._trainable if self._needs_master(n)]
            templates = [selection_template(self._params[n], self._selections.get(n)) for n in names]
            self._fp32_grads = dict(zip(names, flat_like(templates)))
        return self._fp32_grads[name]

    def _drop_fp32_grads(self) -> None:
        self._fp32_grads = None
        self._buffered_grads.clear()

    @torch.no_grad()
    def _accumulate_fp32_grad(self, name: str, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: add the gradient autograd just left on `p` to its fp32 gradient."""
        if p.grad is None:
            return
        master = self._masters.get(name)
        acc = master.grad if master is not None and master.grad is not None else (
            self._fp32_grads[name] if name in self._buffered_grads else None)
        keep = any(check() for check in list(self._grad_keep_checks.values()))
        if keep and acc is None:
            return  # nothing accumulated in fp32: the engine reduces the gradient as autograd made it
        sel = self._selections.get(name)
        g = selected(p.grad, sel)  # mode ratio: only the selected entries go up to fp32
        if acc is None:
            acc = self._fp32_grad_slot(name).copy_(g)
            self._buffered_grads.add(name)
        else:
            acc.add_(g)
        if keep:
            # The engine reduces p.grad in this backward (DDP's sync pass): hand it the whole sum, rounded once.
            write_selected(p.grad, sel, acc)
            self._buffered_grads.discard(name)
            if master is not None:
                master.grad = None
        else:
            p.grad = None

    def gradient_holders(self, parameters) -> list[torch.Tensor]:
        """`parameters` (e.g. `model.parameters()`), with each one whose gradient now lives on its fp32 master
        replaced by that master: what gradient clipping must see (HF's Trainer clips through this)."""
        self._attach_master_grads()
        names = {id(p): n for n, p in self._params.items()}
        out = []
        for p in parameters:
            master = self._masters.get(names.get(id(p)))
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
        for name in self._inactive_names:  # not in the param groups: dropped like the trained ones
            self._params[name].grad = None
        for master in self._masters.values():
            if master.grad is not None:
                if set_to_none:
                    master.grad = None
                else:
                    master.grad.zero_()
        if set_to_none:
            self._drop_fp32_grads()
        elif self._fp32_grads is not None:
            for view in self._fp32_grads.values():
                view.zero_()

    # --- non-finite steps -----------------------------------------------------------------------------

    @torch.no_grad()
    def grads_finite(self) -> bool:
        """Whether every gradient the inner optimizer is about to use is finite, on every rank: one fused
        reduction (each tensor's largest |g|: NaN and inf propagate, no overflow) and, under an engine, one
        all-reduce of the verdict. Costs one host sync per step."""
        grads = [t.grad for g in self.inner.param_groups for t in g["params"] if t.grad is not None]
        if grads:
            norms = torch._foreach_norm(grads, float("inf"))
            bad = (~torch.stack([n.to(norms[0].device) for n in norms]).float().isfinite()).any().float()
        else:
            bad = torch.zeros((), device=local_shard(next(iter(self._params.values()))).device)
        for reduce in list(self._flag_reducers.values()):
            reduce(bad)
        if bad.device.type == "meta":  # a dry run (badam-hf estimate --exact) has no values: it never skips
            return True
        return not bool(bad)

    @torch.no_grad()
    def _skip_step(self) -> None:
        """Drop this step's gradients; weights, masters and moments stay as they were (masters held split go
        back to being split: the weights are rewritten with the bits they already hold)."""
        for buf in self._master_buffers:
            for m in buf.masters:
                m.grad = None
            if self.config.split_masters and buf.can_split:
                buf.split()
        for name in self._trainable + self._inactive_names:
            self._params[name].grad = None
        self._drop_fp32_grads()
        self.note_step(skipped=True)
        self.advance()

    def note_step(self, skipped: bool) -> None:
        """Count a step taken or skipped for inf/NaN gradients; too many skips in a row stop training."""
        if not skipped:
            self._skips_in_a_row = 0
            return
        self.skipped_steps += 1
        self._skips_in_a_row += 1
        where = f"step {self.global_step + 1}, block {self.active_block_name!r}"
        if self._skips_in_a_row >= self.config.max_skipped_steps:
            raise NonFiniteGradientError(
                f"{self._skips_in_a_row} optimizer steps in a row had inf/NaN gradients (the last at {where}); "
                f"stopping (max_skipped_steps={self.config.max_skipped_steps}). The weights hold the values from before "
                "the first skipped step. Try a lower learning rate or a longer warmup, gradient clipping "
                "(max_grad_norm), bf16 instead of fp16, or look for broken examples in the data; then resume from "
                "the last checkpoint."
            )
        logger.warning(
            "BAdam skipped optimizer step (%s): inf/NaN gradient; weights, masters and moments unchanged. The step "
            "still counts towards switch_every. %d skipped so far, %d in a row (training stops at %d).",
            where, self.skipped_steps, self._skips_in_a_row, self.config.max_skipped_steps,
        )

    # --- BREAD: a stateless step for the parameters Adam does not train, inside the backward ----------

    def _inactive_scope(self, active: list[str]) -> list[str]:
        """`inactive_scope=all`: every other parameter. `above`: those whose backward runs anyway, i.e. at or
        above the lowest active position (input side < layers 0..L-1 < output side), so the truncation holds."""
        active_set = set(active)
        rest = [n for n in self._names if n not in active_set]
        if self.config.inactive.inactive_scope == "all":
            return rest
        part = self.partition
        top = len(part.stacks[0].layers) if part.stacks else 0

        def position(name: str) -> int:
            if name in part.input_side:
                return -1
            return part.layer_of.get(name, top)

        lowest = min((position(n) for n in active), default=top)
        return [n for n in rest if position(n) >= lowest]

    def _set_inactive(self, names: list[str]) -> None:
        keep = set(names)
        for name in list(self._inactive_hooks):
            if name not in keep:
                self._inactive_hooks.pop(name).remove()
                p = self._params[name]
                p.grad = None
                if name not in self._trainable:
                    p.requires_grad_(False)
        self._inactive_names = list(names)
        for name in names:
            p = self._params[name]
            p.requires_grad_(True)
            if name not in self._inactive_hooks:
                self._inactive_hooks[name] = p.register_post_accumulate_grad_hook(
                    functools.partial(self._inactive_grad_hook, name))

    def _at_boundary(self) -> bool:
        checks = list(self._boundary_checks.values())
        return all(check() for check in checks) if checks else True

    def _inactive_grad_hook(self, name: str, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook of an inactive parameter: in the last micro-batch's backward, take the step
        on the whole accumulated gradient and free it (earlier micro-batches leave it accumulating)."""
        if p.grad is not None and self._at_boundary():
            self._inactive_step(name, p)

    @torch.no_grad()
    def _inactive_step(self, name: str, p: torch.Tensor) -> None:
        cfg = self.config.inactive
        # The lr the step about to happen uses (LR schedulers move the outer groups after each step).
        lr = self.param_groups[0 if name in self._decay_names else 1]["lr"] * cfg.inactive_lr_scale
        g = p.grad
        p.grad = None
        g = g.sign_() if cfg.inactive_update == "signsgd" else g
        if cfg.inactive_rounding == "stochastic" and p.dtype == torch.bfloat16:
            # The step in fp32, rounded at random: an update below half a bf16 ulp survives in expectation.
            key = rounding_key(self.config.schedule.seed, self.global_step + 1, self._index[name], INACTIVE_STREAM)
            stochastic_add_(local_shard(p), local_shard(g), -lr, key, start=global_start(p))
        else:
            p.add_(g, alpha=-lr)

    def _apply_waiting_inactive(self) -> None:
        for name in self._inactive_names:
            p = self._params[name]
            if p.grad is not None:
                self._inactive_step(name, p)

    # --- parameters replaced by an engine (accelerate's FSDP2 prepare) --------------------------------

    def _current_parameters(self) -> dict[str, nn.Parameter]:
        # Wrappers applied in place may add these to the names (activation checkpointing, torch.compile).
        return {
            n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): p
            for n, p in self.model.named_parameters()
        }

    def rebind_parameters(self) -> bool:
        """Pick up parameters that an engine replaced after this optimizer was built. The Trainer builds the
        optimizer first and then lets accelerate shard the model in place with FSDP2, which turns every
        parameter into a new DTensor. The active block then gets fresh masters from the new parameters.
        Runs by itself at the first step (and in state_dict / load_state_dict before it); engines that
        replace parameters call it when they attach. Returns whether anything changed."""
        now = list(self.model.parameters())
        if len(now) == len(self._params) and all(a is b for a, b in zip(now, self._params.values())):
            return False
        current = self._current_parameters()
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
        self._inactive_hooks.clear()  # their hooks went with the old parameters
        self._activate(self.active_blocks, fresh=True)
        return True

    def _first_step_pre_hook(self) -> None:
        if not self._has_stepped:
            self._rebind_if_not_stepped()
            self._has_stepped = True

    def _rebind_if_not_stepped(self) -> None:
        if not self._has_stepped and self._driver is None:  # a driving engine owns the parameters' layout
            self.rebind_parameters()

    # --- extension points -----------------------------------------------------------------------------

    def _init_extension_points(self) -> None:
        self._switch_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._grad_keep_checks: OrderedDict[int, Callable[[], bool]] = OrderedDict()
        self._boundary_checks: OrderedDict[int, Callable[[], bool]] = OrderedDict()
        self._flag_reducers: OrderedDict[int, Callable[[torch.Tensor], None]] = OrderedDict()
        self._driver = None  # see attach_driver

    @staticmethod
    def register_construction_check(fn: Callable[[nn.Module], None]) -> RemovableHandle:
        handle = RemovableHandle(BlockOptimizer._construction_checks)
        BlockOptimizer._construction_checks[handle.id] = fn
        return handle

    @staticmethod
    def register_init_hook(fn: Callable[["BlockOptimizer"], None]) -> RemovableHandle:
        handle = RemovableHandle(BlockOptimizer._init_hooks)
        BlockOptimizer._init_hooks[handle.id] = fn
        return handle

    def register_switch_hook(self, hook: Callable[["BlockOptimizer"], None]) -> RemovableHandle:
        handle = RemovableHandle(self._switch_hooks)
        self._switch_hooks[handle.id] = hook
        return handle

    def register_grad_keep_check(self, check: Callable[[], bool]) -> RemovableHandle:
        handle = RemovableHandle(self._grad_keep_checks)
        self._grad_keep_checks[handle.id] = check
        return handle

    def register_flag_reduce(self, fn: Callable[[torch.Tensor], None]) -> RemovableHandle:
        handle = RemovableHandle(self._flag_reducers)
        self._flag_reducers[handle.id] = fn
        return handle

    def register_boundary_check(self, check: Callable[[], bool]) -> RemovableHandle:
        """`check()` -> True during the backward of the last micro-batch before an optimizer step (HF's
        `accelerator.sync_gradients`). `inactive_update` applies its step in that backward; in the earlier
        micro-batches the inactive gradients accumulate on the parameters. Without any check every backward
        counts as the last one (a loop without gradient accumulation); a plain loop with accumulation registers
        `lambda: (micro_batch + 1) % accumulation == 0`. Gradients still waiting at `step()` are applied there."""
        handle = RemovableHandle(self._boundary_checks)
        self._boundary_checks[handle.id] = check
        return handle

    def attach_driver(self, driver) -> RemovableHandle:
        """Hand the step to an engine that owns the fp32 masters (DeepSpeed ZeRO-3): `step()` calls
        `driver.step(closure)`, no masters are made, and the current block is re-activated in that layout."""
        self._driver = driver
        self.restore_param_groups()
        self.seek(self.global_step)  # drops masters built before the engine existed
        return _DriverHandle(self, driver)

    def restore_param_groups(self) -> None:
        """Put back the two (decay / no decay) group dicts, e.g. after an engine dropped the empty ones."""
        self.param_groups[:] = list(self._group_dicts)

    def clear_block_state(self) -> None:
        """Drop the inner optimizer's state and the fp32 masters (an engine rebuilding its own layout)."""
        self._drop_state_of(self._trainable)
        self.inner.state.clear()  # a driving engine keys the inner state by tensors of its own
        self._set_inactive([])

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
        return list(self._inactive_names)

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
        for buf in self._master_buffers:
            buf.join()
        return MappingProxyType(self._masters)

    @property
    def master_grads(self) -> dict[str, torch.Tensor]:
        """Name -> the fp32 gradient accumulated so far for an active low-precision parameter."""
        out = {n: self._fp32_grads[n] for n in self._buffered_grads} if self._fp32_grads is not None else {}
        out.update({n: m.grad for n, m in self._masters.items() if m.grad is not None})
        return out

    @property
    def switch_hooks(self) -> list[Callable]:
        return list(self._switch_hooks.values())

    @property
    def driver(self):
        """The engine driving the step (see `attach_driver`), or None."""
        return self._driver

    @property
    def steps_in_block(self) -> int:
        return self.schedule.position(self.global_step)[2]

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held for the active block: fp32 masters, inner-optimizer state, and grads."""
        masters = sum(buf.nbytes() for buf in self._master_buffers)
        state = sum(
            v.numel() * v.element_size()
            for st in self.inner.state.values()
            for v in st.values()
            if torch.is_tensor(v)
        )
        # fp32 gradients live in one buffer (see _fp32_grad_slot); what is still on the parameters comes on top.
        grads = sum(local_shard(p.grad).numel() * p.grad.element_size() for p in self._params.values()
                    if p.grad is not None)
        if self._fp32_grads is not None:
            grads += sum(v.numel() * v.element_size() for v in self._fp32_grads.values())
        # Mode ratio, mask_mode scatter: the index tensors of the selected entries (4 bytes per entry).
        selections = sum(s.numel() * s.element_size() for s in self._selections.values() if torch.is_tensor(s))
        return {"masters": masters, "optimizer_state": state, "grads": grads, "selections": selections}

    # --- checkpointing --------------------------------------------------------------------------------

    # torch's state-dict hooks run as in torch.optim.Optimizer (engines add their state through them).

    def state_dict(self) -> dict[str, Any]:
        """Plain containers and tensors only, so `torch.load(weights_only=True)` reads it (the format:
        `badam_hf.core.checkpoint`)."""
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

    def _group_names(self, gi: int) -> list[str]:
        """Names in param group `gi` (0: weight decay, 1: none), in their order there."""
        return [n for n in self._trainable if (n in self._decay_names) == (gi == 0)]


class _DriverHandle:
    def __init__(self, opt: BlockOptimizer, driver):
        self._opt, self._driver = opt, driver

    def remove(self) -> None:
        if self._opt._driver is self._driver:
            self._opt._driver = None


def unwrap_optimizer(optimizer) -> BlockOptimizer | None:
    """The BlockOptimizer inside accelerate's AcceleratedOptimizer (or any `.optimizer` wrapper)."""
    for _ in range(5):
        if optimizer is None or isinstance(optimizer, BlockOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None
