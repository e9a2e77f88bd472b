"""Trainer glue: `BAdamTrainer`, `make_badam_trainer(cls)` for any Trainer subclass, and `BAdamCallback`;
`save_full_model(trainer)` for a final save that also works under FSDP with a sharded state dict.

The optimizer switches blocks itself inside `step()`, which the Trainer calls once per optimizer step
(after gradient accumulation), so a switch can never fall inside an accumulation window. The active
block is a pure function of the optimizer's step count; the callback keeps that count aligned with
`state.global_step` when a run resumes without optimizer state, and adds the active block to the logs.
"""

from __future__ import annotations

import weakref

from transformers import Trainer, TrainerCallback

from ..core.config import BAdamConfig
from ..core.optimizer import BlockOptimizer, check_model, partition_for, schedule_for, unwrap_optimizer
from ..engines.dispatch import attach_wrapped_model, check_training_args


def block_optimizer_from_args(
    model, args, config: BAdamConfig | None = None, decay_parameter_names=None, partition=None
) -> BlockOptimizer:
    """Build a BlockOptimizer from `TrainingArguments` (lr, betas, eps, weight decay, optim_args)."""
    if config is None:
        config = BAdamConfig.from_optim_args(args.optim_args, args.optim_target_modules)
    return BlockOptimizer(
        model,
        config,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
        decay_parameter_names=decay_parameter_names,
        partition=partition,
    )


class BAdamCallback(TrainerCallback):
    """Aligns the block schedule with the Trainer's step count and logs the active block."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = unwrap_optimizer(optimizer)
        if opt is not None and opt.global_step != state.global_step:
            # Resumed without the optimizer's own state: the block still follows from the step count.
            opt.seek(state.global_step)
        if opt is not None:
            opt.total_steps = state.max_steps  # its last step drops every master (switch_rounding applies)
        # Multi-process DDP: the Trainer has wrapped the model by now; keep its reducer on the active block.
        trainer = self._trainer() if getattr(self, "_trainer", None) is not None else None
        if opt is not None and trainer is not None:
            attach_wrapped_model(getattr(trainer, "model_wrapped", None), opt)
            if getattr(trainer.accelerator, "scaler", None) is not None and getattr(self, "_scaler_kept", None) is not opt:
                # fp16 loss scaling unscales and checks the gradients on the optimizer's parameters: leave them
                # there (the bf16 path) rather than on the fp32 masters. Once per optimizer (a later train()
                # may build a new one).
                opt.register_grad_keep_check(lambda: True)
                self._scaler_kept = opt
            if opt.config.inactive.enabled and getattr(self, "_boundary_for", None) is not opt:
                # BREAD's in-backward step belongs to the last micro-batch of each optimizer step: the Trainer
                # says which one that is (it sets sync_gradients before that micro-batch's backward).
                accelerator = trainer.accelerator
                opt.register_boundary_check(lambda: bool(accelerator.sync_gradients))
                self._boundary_for = opt

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        opt = unwrap_optimizer(optimizer)
        if opt is not None:
            opt.finish()  # training stopped before max_steps: round the live masters as at a block's end

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        opt = unwrap_optimizer(optimizer)
        if opt is None or logs is None:
            return
        # The block that took the latest optimizer step, i.e. the one whose training this log reports. (The
        # optimizer has already switched to the next block inside that step when a block just finished.)
        blocks = opt.schedule.active_at(max(opt.global_step - 1, 0))
        if opt.mode == "ratio":  # every block trains; what moves is the masks, once per period
            extra = {"badam/mask_period": opt.schedule.period(max(opt.global_step - 1, 0))}
        else:  # mode lisa: the lowest sampled block, and all of their names
            extra = {"badam/active_block": blocks[0], "badam/active_block_name": opt.blocks_name(blocks)}
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)


def ensure_badam_callback(trainer: Trainer) -> None:
    """Add the callback once, first in line, so printers and reporters see the keys it adds to the logs."""
    callbacks = trainer.callback_handler.callbacks
    if not any(isinstance(cb, BAdamCallback) for cb in callbacks):
        callbacks.insert(0, BAdamCallback())
    for cb in callbacks:
        if isinstance(cb, BAdamCallback):
            cb._trainer = weakref.ref(trainer)  # to reach `trainer.model_wrapped` (DDP) at train begin


class BAdamMixin:
    """Makes a Trainer (sub)class train with BAdam. Settings come from `badam_config=` or from
    `args.optim_args` / `args.optim_target_modules`, and are checked against the model at construction."""

    def __init__(self, *args, badam_config: BAdamConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if badam_config is None:
            badam_config = BAdamConfig.from_optim_args(self.args.optim_args, self.args.optim_target_modules)
        self.badam_config = badam_config
        check_training_args(self.args)
        # Fail now, before any data is touched by train(): bad model, bad partition, bad start block.
        check_model(self.model)
        self._badam_partition = (self.model, partition_for(self.model, badam_config))
        schedule_for(self._badam_partition[1], badam_config)
        ensure_badam_callback(self)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            cached_model, partition = self._badam_partition
            self.optimizer = block_optimizer_from_args(
                opt_model,
                self.args,
                self.badam_config,
                decay_parameter_names=self.get_decay_parameter_names(opt_model),
                partition=partition if cached_model is opt_model else None,
            )
        return self.optimizer


def make_badam_trainer(trainer_cls: type[Trainer]) -> type[Trainer]:
    """`make_badam_trainer(SFTTrainer)` -> a subclass that trains with BAdam."""
    if issubclass(trainer_cls, BAdamMixin):
        return trainer_cls
    return type(f"BAdam{trainer_cls.__name__}", (BAdamMixin, trainer_cls), {"__module__": __name__})


class BAdamTrainer(BAdamMixin, Trainer):
    """`transformers.Trainer` that trains with BAdam: a drop-in replacement in existing scripts."""


def save_full_model(trainer: Trainer) -> None:
    """`trainer.save_model()` that also writes the model under FSDP with a sharded state dict.

    HF's `Trainer.save_model` silently writes nothing when accelerate's FSDP plugin holds a sharded state
    dict (`fsdp_state_dict_type: SHARDED_STATE_DICT`, the 70B config's): switch the plugin to a full state
    dict for this one final save, so the full weights are gathered and saved. Call it after training:
    checkpoints written during training stay sharded."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if trainer.is_fsdp_enabled and plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model()
