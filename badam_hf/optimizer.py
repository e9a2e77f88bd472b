"""`BlockOptimizer`: block-coordinate Adam (BAdam) as a `torch.optim.Optimizer`.

Only the active block (plus any always-active modules) requires grad. Its parameters are handed to an
inner optimizer (AdamW by default); for bf16 weights the inner optimizer sees fp32 master copies, so
fp32 master + moments exist for the active block only and are freed at every switch. The optimizer
switches block by itself after `switch_every` successful steps, so a plain PyTorch loop needs nothing
else:

    opt = BlockOptimizer(model, lr=1e-5, switch_every=100)
    loss.backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .backward_truncation import BackwardTruncation
from .config import BAdamConfig, BAdamConfigError
from .distributed import check_engine, install_step_guard
from .partition import Partition, partition_model
from .schedule import BlockSchedule

STATE_VERSION = 1


# --- functional core: fp32 masters for low-precision weights ---------------------------------------
# Under FSDP2 a parameter is a DTensor holding this rank's shard; masters, moments and the grads the inner
# optimizer sees are plain tensors over the local shard, so each rank keeps state for 1/N of the block.


def is_sharded(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (a DTensor's local shard, which shares its storage), else `t` itself."""
    return t.to_local() if is_sharded(t) else t


def needs_master(param: torch.Tensor) -> bool:
    # A DTensor always gets a plain local master: the inner optimizer's state then stays per-rank plain
    # tensors, whatever the weights' dtype (for fp32 weights that costs 4 bytes per local active element).
    return param.dtype != torch.float32 or is_sharded(param)


@torch.no_grad()
def make_master(param: torch.Tensor) -> torch.Tensor:
    return local_shard(param.detach()).to(torch.float32, copy=True)


@torch.no_grad()
def grads_to_masters(params: list[torch.Tensor], masters: list[torch.Tensor]) -> None:
    """Move each low-precision grad up to its master (fp32) and free the low-precision one."""
    for p, m in zip(params, masters):
        m.grad = None if p.grad is None else local_shard(p.grad).to(torch.float32)
        p.grad = None


@torch.no_grad()
def masters_to_params(params: list[torch.Tensor], masters: list[torch.Tensor]) -> None:
    """Write the updated masters back into the model's weights (or local shards); drop the master grads."""
    for p, m in zip(params, masters):
        local_shard(p).copy_(m)
        m.grad = None


def hf_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names that get weight decay under HF Trainer's rule (no decay for biases and norm weights)."""
    from transformers import Trainer

    # The method reads nothing from the Trainer instance; calling it keeps us on HF's exact, current rule.
    return set(Trainer.get_decay_parameter_names(None, model))


def check_model(model: nn.Module) -> None:
    """Refuse models BAdam cannot train correctly, before anything changes."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but keep the check usable without it
        PeftModel = ()
    if (PeftModel and isinstance(model, PeftModel)) or getattr(model, "_hf_peft_config_loaded", False):
        raise BAdamConfigError(
            "the model is a PEFT/LoRA model; BAdam trains the full parameters block by block. Pass the base "
            "model (model.get_base_model() or merge_and_unload()), or use a PEFT optimizer instead."
        )
    fp16 = [n for n, p in model.named_parameters() if p.dtype == torch.float16]
    if fp16:
        raise BAdamConfigError(
            f"the model has float16 weights ({fp16[0]!r}, ...); BAdam supports bfloat16 weights (load with "
            "torch_dtype=torch.bfloat16, the paper's setting) or float32 weights (optionally with fp16 autocast "
            "and loss scaling)."
        )


class BlockOptimizer(torch.optim.Optimizer):
    """Block-coordinate optimizer over `model`'s parameters.

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

    # Set by badam_hf.deepspeed_zero3.attach_deepspeed: DeepSpeed ZeRO-3 then owns the fp32 master partitions
    # and drives step() once per sub-group; the glue counts real steps and rebuilds ZeRO-3 at each switch.
    engine_glue = None

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
        check_engine(model)  # FSDP version 1 and unsynchronisable setups: refused before anything changes
        check_model(model)
        self.model = model
        self.config = config
        self.partition = partition if partition is not None else partition_model(model, config.partition)
        self.schedule = BlockSchedule(len(self.partition), config.schedule)

        self._params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self._names: list[str] = list(self._params)
        self._index = {n: i for i, n in enumerate(self._names)}
        decay = hf_decay_parameter_names(model) if decay_parameter_names is None else set(decay_parameter_names)
        self._decay = decay
        self._masters: dict[str, torch.Tensor] = {}
        # Called as hook(optimizer) after every (re)activation of a block: distributed engines re-register
        # the new trainable set here (see badam_hf.distributed).
        self.switch_hooks: list = []
        self.global_step = 0
        self.active_block: int = self.schedule.block_at(0)

        # Freeze everything; _activate unfreezes the active block.
        for p in self._params.values():
            p.requires_grad_(False)
            p.grad = None
        self._trainable: list[str] = []

        inner_cls = config.inner_optimizer_cls
        accepted = inspect.signature(inner_cls.__init__).parameters
        hyper = {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps}
        inner_defaults = {k: v for k, v in hyper.items() if k in accepted}
        inner_defaults.update(inner_kwargs or {})
        # Built once over two (decay, no decay) groups whose `params` lists change in place at each switch.
        # Explicit per-group weight decay: a base optimizer's default (AdamW: 0.01) must never override it.
        inner_groups = [{"params": []}, {"params": []}]
        if "weight_decay" in accepted:
            inner_groups[0]["weight_decay"], inner_groups[1]["weight_decay"] = weight_decay, 0.0
        self.inner = inner_cls(inner_groups, **inner_defaults)

        self.truncation = BackwardTruncation(model, self.partition, enabled=config.truncate_backward)
        outer_groups = [{k: v for k, v in g.items() if k != "params"} | {"params": []} for g in self.inner.param_groups]
        super().__init__(outer_groups, dict(self.inner.defaults))
        self._badam_group_dicts = tuple(self.param_groups)  # an engine may drop empty groups (DeepSpeed does)
        install_step_guard(self)  # >1 process: the first step needs a DDP wrapper attached (attach_ddp)
        self._activate(self.active_block, fresh=True)

    # --- introspection ----------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.partition)

    @property
    def active_block_name(self) -> str:
        return self.partition.blocks[self.active_block].name

    @property
    def trainable_names(self) -> list[str]:
        return list(self._trainable)

    @property
    def steps_in_block(self) -> int:
        return self.schedule.position(self.global_step)[2]

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held for the active block: fp32 masters, inner-optimizer state, and grads."""
        masters = sum(m.numel() * m.element_size() for m in self._masters.values())
        state = sum(
            v.numel() * v.element_size()
            for st in self.inner.state.values()
            for v in st.values()
            if torch.is_tensor(v)
        )
        grads = sum(
            local_shard(t.grad).numel() * t.grad.element_size()
            for t in list(self._params.values()) + list(self._masters.values())
            if t.grad is not None
        )
        return {"masters": masters, "optimizer_state": state, "grads": grads}

    # --- block switching ----------------------------------------------------------------------------

    def _target(self, name: str) -> torch.Tensor:
        """What the inner optimizer updates for `name`: its fp32 master, or the parameter itself."""
        return self._masters.get(name, self._params[name])

    def _activate(self, block: int, fresh: bool = False) -> None:
        new = list(self.partition.blocks[block].param_names) + list(self.partition.always_active)
        new_set = set(new)
        for name in self._trainable:
            if name in new_set and not fresh:
                continue  # always-active parameters keep their master and moments across switches
            self.inner.state.pop(self._target(name), None)
            self._masters.pop(name, None)
            p = self._params[name]
            if name not in new_set:
                p.requires_grad_(False)
                p.grad = None
        for name in new:
            p = self._params[name]
            p.requires_grad_(True)
            if needs_master(p) and name not in self._masters and self.engine_glue is None:
                self._masters[name] = make_master(p)
        # Keep the two group dicts (and their list objects): LR schedulers hold on to them.
        for gi, decays in ((0, True), (1, False)):
            names = [n for n in new if (n in self._decay) == decays]
            self.param_groups[gi]["params"][:] = [self._params[n] for n in names]
            self.inner.param_groups[gi]["params"][:] = [self._target(n) for n in names]
        self._trainable = new
        self.active_block = block
        self.truncation.update(new)
        for hook in self.switch_hooks:
            hook(self)

    # --- parameters replaced by an engine (accelerate's FSDP2 prepare) ------------------------------

    def _current_parameters(self) -> dict[str, nn.Parameter]:
        # Wrappers applied in place may add these to the names (activation checkpointing, torch.compile).
        return {
            n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): p
            for n, p in self.model.named_parameters()
        }

    def rebind_parameters(self) -> bool:
        """Pick up parameters that an engine replaced after this optimizer was built. The Trainer builds the
        optimizer first and then lets accelerate shard the model in place with FSDP2, which turns every
        parameter into a new DTensor. The active block then gets fresh masters from the new parameters (this
        happens before the first step, or before a checkpoint is loaded). Returns whether anything changed."""
        # Called at every step: first an identity check in parameter order, with no name handling.
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
        for name in self._trainable:
            self.inner.state.pop(self._target(name), None)
        self._masters.clear()
        self._params = {n: current[n] for n in self._names}
        for p in self._params.values():
            p.requires_grad_(False)
        self._activate(self.active_block, fresh=True)
        return True

    def seek(self, step: int) -> None:
        """Jump the schedule to `step` optimizer steps done, with fresh state for the block active there."""
        self.global_step = int(step)
        self._activate(self.schedule.block_at(self.global_step), fresh=True)

    def _sync_hyperparameters(self) -> None:
        for outer, inner in zip(self.param_groups, self.inner.param_groups):
            for k, v in outer.items():
                if k != "params" and k in inner:
                    inner[k] = v

    @torch.no_grad()
    def step(self, closure=None):
        if self.engine_glue is not None:  # DeepSpeed ZeRO-3: the engine owns the fp32 masters and the step count
            return self.engine_glue.client_step(closure)
        self.rebind_parameters()
        if any(hasattr(p, "ds_id") for g in self.param_groups for p in g["params"]):
            from .deepspeed_zero3 import refuse_unattached  # stepped by DeepSpeed without attach_deepspeed

            refuse_unattached(self)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        names = [n for n in self._trainable if n in self._masters]
        params = [self._params[n] for n in names]
        masters = [self._masters[n] for n in names]
        self._sync_hyperparameters()
        grads_to_masters(params, masters)
        self.inner.step()
        masters_to_params(params, masters)
        self.global_step += 1
        nxt = self.schedule.block_at(self.global_step)
        if nxt != self.active_block:
            self._activate(nxt)
        return loss

    # --- checkpointing ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain containers and tensors only, so `torch.load(weights_only=True)` reads it."""
        self.rebind_parameters()
        epoch, _, in_block = self.schedule.position(self.global_step)
        state: dict[int, dict[str, Any]] = {}
        for name in self._trainable:
            entry = dict(self.inner.state.get(self._target(name), {}))
            if name in self._masters:
                entry["master"] = self._masters[name]
            if entry:
                state[self._index[name]] = entry
        groups = [
            {k: v for k, v in g.items() if k != "params"} | {"params": [self._index[n] for n in self._group_names(i)]}
            for i, g in enumerate(self.param_groups)
        ]
        badam = {
            "version": STATE_VERSION,
            "step": self.global_step,
            "block": self.active_block,
            "block_name": self.active_block_name,
            "steps_in_block": in_block,
            "block_epoch": epoch,
            "order": list(self.schedule.epoch_order(epoch)),
            "seed": self.config.schedule.seed,
            "switch_every": self.schedule.switch_every,
            "switch_mode": self.schedule.mode,
            "block_names": self.partition.names,
            "inner_optimizer": type(self.inner).__name__,
            "shards": self._shards(),
        }
        out = {"state": state, "param_groups": groups, "badam": badam}
        if self.engine_glue is not None:  # DeepSpeed ZeRO-3: the inner state lives on its fp32 partitions
            out["engine"] = self.engine_glue.state_dict()
        return out

    def _shards(self) -> int:
        """How many ranks the saved state is split over: the world size under FSDP2, else 1."""
        if any(is_sharded(p) for p in self._params.values()) and torch.distributed.is_initialized():
            return torch.distributed.get_world_size()
        return 1

    def _group_names(self, gi: int) -> list[str]:
        return [n for n in self._trainable if (n in self._decay) == (gi == 0)]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rebind_parameters()
        badam = state_dict.get("badam")
        if badam is None:
            raise ValueError(
                "this optimizer state was not saved by badam_hf's BlockOptimizer (no 'badam' entry); "
                "start without resuming the optimizer or use a BAdam checkpoint."
            )
        if badam["block_names"] != self.partition.names:
            raise ValueError(
                f"the checkpoint's blocks ({len(badam['block_names'])}, first {badam['block_names'][:2]}) differ "
                f"from this model's ({self.num_blocks}, first {self.partition.names[:2]}); resume with the same "
                "model and partition settings."
            )
        for key, mine in (
            ("switch_every", self.schedule.switch_every),
            ("switch_mode", self.schedule.mode),
            ("seed", self.config.schedule.seed),
        ):
            if badam[key] != mine:
                raise ValueError(f"the checkpoint was saved with {key}={badam[key]!r} but this run has {key}={mine!r}.")
        if badam.get("shards", 1) != self._shards():
            raise ValueError(
                f"the checkpoint's optimizer state is split over {badam.get('shards', 1)} rank(s) (FSDP2 shards) but "
                f"this run has {self._shards()}; resume with the same number of processes and the same sharding."
            )
        step = int(badam["step"])
        block = self.schedule.block_at(step)
        if block != badam["block"]:
            raise ValueError(
                f"the checkpoint's active block {badam['block']} does not follow from its step {step} under this "
                "run's schedule; resume with the same start_block and switch settings."
            )
        # Validate everything before changing anything, so a refused load leaves the optimizer as it was.
        will_train = set(self.partition.blocks[block].param_names) | set(self.partition.always_active)
        stray = [i for i in state_dict["state"] if self._names[int(i)] not in will_train]
        if stray:
            raise ValueError(f"the checkpoint has optimizer state for inactive parameter {self._names[int(stray[0])]!r}.")
        if self.engine_glue is not None:  # DeepSpeed ZeRO-3: its part must be there (and fit) before anything changes
            self.engine_glue.check_state_dict(state_dict)
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.seek(step)

        saved_state = state_dict["state"]
        with torch.no_grad():
            for i, entry in saved_state.items():
                name = self._names[int(i)]
                if "master" in entry:
                    self._masters[name].copy_(entry["master"])
        # Let torch.optim place and cast the moments: rebuild the inner state dict in its own format.
        order = [self._target(n) for g in range(2) for n in self._group_names(g)]
        position = {id(t): k for k, t in enumerate(order)}
        inner_sd = self.inner.state_dict()
        inner_sd["state"] = {}
        for i, entry in saved_state.items():
            moments = {k: v for k, v in entry.items() if k != "master"}
            if moments:
                inner_sd["state"][position[id(self._target(self._names[int(i)]))]] = moments
        self.inner.load_state_dict(inner_sd)
        if self.engine_glue is not None:
            self.engine_glue.load_state_dict(state_dict["engine"])


def unwrap_optimizer(optimizer) -> BlockOptimizer | None:
    """The BlockOptimizer inside accelerate's AcceleratedOptimizer (or any `.optimizer` wrapper)."""
    for _ in range(5):
        if optimizer is None or isinstance(optimizer, BlockOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None
