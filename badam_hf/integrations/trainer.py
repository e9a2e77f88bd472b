"""Trainer glue: `BAdamTrainer`, `make_badam_trainer(cls)` for any Trainer subclass, and `BAdamCallback`;
`save_full_model(trainer)` for a final save that also works under FSDP with a sharded state dict.

The optimizer switches blocks itself inside `step()`, which the Trainer calls once per optimizer step
(after gradient accumulation), so a switch can never fall inside an accumulation window. The active
block is a pure function of the optimizer's step count; the callback keeps that count aligned with
`state.global_step` (when a run resumes without optimizer state, and when a loss scaler skips a step),
and adds the active block and the skipped steps to the logs. `check_resume` refuses an optimizer state
that cannot be read or belongs to another step before the Trainer loads it (see docs/resume.md).
"""

from __future__ import annotations

import logging
import os
import warnings
import weakref

import torch
from transformers import Trainer, TrainerCallback

from ..core.config import BAdamConfig
from ..core.errors import BAdamConfigError, CheckpointMismatchError
from ..core.optimizer import BlockOptimizer, check_model, partition_for, schedule_for, unwrap_optimizer
from ..engines.common import read_optimizer_state
from ..engines.dispatch import attach_wrapped_model, check_training_args
from .chunked_loss import chunked_causal_lm_loss, unsupported_reason

logger = logging.getLogger(__name__)


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


def refuse_loss_scaling_with_inactive_update(config: BAdamConfig) -> None:
    """fp16 loss scaling and BREAD's inactive update cannot train together: the scaler unscales and inf-checks
    only the optimizer's param groups (the active block), so the inactive step would use gradients `scale`
    times too large, and take it on an overflow the scaler skips. With `inactive_timing=backward` the step
    would even come before the scaler sees anything (inside the backward, on the scaled gradients)."""
    if not config.inactive.enabled:
        return
    if config.inactive.inactive_timing == "backward":
        why = ("with inactive_timing='backward' the inactive layers take their step inside the backward, on "
               "gradients still multiplied by the loss scale, before the scaler unscales or checks anything")
    else:
        why = ("the loss scaler unscales and checks for inf/NaN only the gradients of the active block, so the "
               "inactive layers' step would be scaled and would not be skipped on an overflow")
    raise BAdamConfigError(
        f"inactive_update={config.inactive.inactive_update!r} cannot train with fp16 loss scaling (--fp16): {why}. "
        "Train in bf16 (--bf16, no loss scaling needed) or with inactive_update=none."
    )


class BAdamCallback(TrainerCallback):
    """Aligns the block schedule with the Trainer's step count and logs the active block."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = unwrap_optimizer(optimizer)
        trainer = self._trainer() if getattr(self, "_trainer", None) is not None else None
        resumed_from = trainer.__dict__.pop("_badam_resume_checkpoint", None) if trainer is not None else None
        if opt is not None:
            # An optimizer state loaded for this resume (any engine's path) must be the one saved with the
            # Trainer's state, or its moments belong to another point of the run.
            loaded, opt.loaded_step = opt.loaded_step, None
            if resumed_from is not None and loaded is not None and loaded != state.global_step:
                raise CheckpointMismatchError(
                    f"the optimizer state loaded from {resumed_from} was saved at step {loaded}, but its trainer_state.json "
                    f"says global step {state.global_step}; resume from a checkpoint whose files were saved together."
                )
        if opt is not None and opt.global_step != state.global_step:
            # Resumed without the optimizer's own state: the block still follows from the step count.
            opt.seek(state.global_step)
        if opt is not None:
            opt.total_steps = state.max_steps  # its last step drops every master (switch_rounding applies)
        # Multi-process DDP: the Trainer has wrapped the model by now; keep its reducer on the active block.
        if opt is not None and trainer is not None:
            loss_scaling = getattr(trainer.accelerator, "scaler", None) is not None
            if loss_scaling:
                refuse_loss_scaling_with_inactive_update(opt.config)
            attach_wrapped_model(getattr(trainer, "model_wrapped", None), opt)
            if loss_scaling and getattr(self, "_scaler_kept", None) is not opt:
                # fp16 loss scaling unscales and checks the gradients on the optimizer's parameters: leave them
                # there (the bf16 path) rather than on the fp32 masters. Once per optimizer (a later train()
                # may build a new one).
                opt.register_grad_keep_check(lambda: True)
                self._scaler_kept = opt
            if (opt.config.inactive.enabled and opt.config.inactive.inactive_timing == "backward"
                    and getattr(self, "_boundary_for", None) is not opt):
                # BREAD's in-backward step belongs to the last micro-batch of each optimizer step: the Trainer
                # says which one that is (it sets sync_gradients before that micro-batch's backward).
                accelerator = trainer.accelerator
                opt.register_boundary_check(lambda: bool(accelerator.sync_gradients))
                self._boundary_for = opt

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # A step the loss scaler (fp16) skipped never reached BlockOptimizer.step(); the Trainer counts it all
        # the same, so the block schedule does too (it stays a function of global_step, which resumes rely
        # on). Not one of BAdam's skipped steps: the scaler skips while it looks for its scale.
        opt = unwrap_optimizer(optimizer)
        trainer = self._trainer() if getattr(self, "_trainer", None) is not None else None
        if opt is not None and trainer is not None and opt.global_step == state.global_step \
                and getattr(trainer.accelerator, "optimizer_step_was_skipped", False):
            opt.advance()

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
        extra["badam/skipped_steps"] = opt.skipped_steps
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)


def ensure_badam_callback(trainer: Trainer) -> None:
    """Add the callback once, first in line, so printers and reporters see the keys it adds to the logs; and
    the resume checks in front of the Trainer's optimizer load (BAdamMixin has them as a method)."""
    callbacks = trainer.callback_handler.callbacks
    if not any(isinstance(cb, BAdamCallback) for cb in callbacks):
        callbacks.insert(0, BAdamCallback())
    for cb in callbacks:
        if isinstance(cb, BAdamCallback):
            cb._trainer = weakref.ref(trainer)  # to reach `trainer.model_wrapped` (DDP) at train begin
    if not isinstance(trainer, BAdamMixin) and "_load_optimizer_and_scheduler" not in vars(trainer):
        original = trainer._load_optimizer_and_scheduler  # `--optim badam` on a plain Trainer: this instance only

        def _load_optimizer_and_scheduler(checkpoint):
            check_resume(trainer, checkpoint)
            return original(checkpoint)

        trainer._load_optimizer_and_scheduler = _load_optimizer_and_scheduler


def optimizer_state_file(trainer: Trainer, checkpoint: str) -> str:
    """Where the Trainer reads this process's optimizer state from (FSDP2: one file per rank)."""
    if getattr(trainer, "is_fsdp_enabled", False):
        import torch.distributed as dist

        from ..engines.fsdp2 import shard_file

        if dist.is_initialized():
            return shard_file(checkpoint, dist.get_rank(), dist.get_world_size())
    return os.path.join(checkpoint, "optimizer.pt")


def check_resume(trainer: Trainer, checkpoint: str | None) -> None:
    """Before the Trainer loads the optimizer and LR scheduler from `checkpoint`: refuse an optimizer state that
    cannot be read or was saved at another step than the checkpoint's trainer_state.json; warn once when there
    is none to load (HF then silently restarts the moments and the LR schedule). DeepSpeed loads its own files
    (`engines.deepspeed` reads them; the step is checked at train begin)."""
    opt = unwrap_optimizer(trainer.optimizer)
    if checkpoint is None or opt is None:
        return
    trainer._badam_resume_checkpoint = checkpoint
    if getattr(trainer, "is_deepspeed_enabled", False):
        return  # DeepSpeed has loaded its files already (the load sets opt.loaded_step)
    opt.loaded_step = None  # what accelerate's prepare round-trips through load_state_dict is no resume
    path = optimizer_state_file(trainer, checkpoint)
    scheduler = os.path.join(checkpoint, "scheduler.pt")
    step = trainer.state.global_step
    missing = [f for f in (path, scheduler) if not os.path.isfile(f)]
    if missing:
        if trainer.args.process_index == 0:
            warnings.warn(
                f"resuming from {checkpoint} without optimizer state ({' and '.join(missing)} missing, so the Trainer "
                f"loads neither file): the Adam moments restart from zero and the learning-rate schedule restarts from "
                f"its first step (warmup included), while the data and BAdam's block schedule resume at step {step} "
                f"(block {opt.blocks_name(opt.schedule.active_at(step))!r}). Resume from a checkpoint that has both "
                "files for an exact continuation.",
                UserWarning, stacklevel=3,
            )
        return
    # Read lazily (mmap): only the pickled structure is parsed here, not the tensors' bytes.
    badam = read_optimizer_state(path, mmap=True).get("badam")
    saved = badam.get("step") if isinstance(badam, dict) else None
    if saved is not None and int(saved) != step:
        raise CheckpointMismatchError(
            f"{path} was saved at optimizer step {int(saved)}, but {os.path.join(checkpoint, 'trainer_state.json')} says "
            f"global step {step}: the optimizer state belongs to another checkpoint. Resume from a checkpoint whose "
            f"files were saved together, or delete {path} to restart the moments (with a warning)."
        )


def _trainer_badam_config(trainer) -> BAdamConfig | None:
    config = getattr(trainer, "badam_config", None)
    if config is None:
        opt = unwrap_optimizer(getattr(trainer, "optimizer", None))
        config = opt.config if opt is not None else None
    return config


def _chunked_loss_off_reason(trainer, model, inputs) -> str | None:
    """Why this compute_loss call keeps the model's own loss; None when it is chunked."""
    config = _trainer_badam_config(trainer)
    if config is None or not config.chunked_loss:
        return "chunked_loss=false"
    if not model.training or not torch.is_grad_enabled() or "labels" not in inputs:
        return "not a training step with labels"  # evaluation and prediction keep the full logits
    if trainer.label_smoother is not None or trainer.compute_loss_func is not None:
        return "the Trainer computes the loss from the logits (label smoothing or compute_loss_func)"
    if any(cls.__module__.split(".")[0] == "trl" for cls in type(trainer).__mro__):
        return "a TRL trainer computes its own loss (SFTTrainer's fused LM head has no full logits either)"
    if getattr(trainer.args, "use_liger_kernel", False):
        return "use_liger_kernel: Liger's fused linear cross-entropy has no full logits either"
    owner = _compute_loss_owner(trainer)
    if owner is not Trainer:  # it may read the logits, which the chunked loss never makes
        return f"{owner.__name__}.compute_loss is not the Trainer's own"
    return unsupported_reason(model)


def _compute_loss_owner(trainer) -> type:
    """The class whose compute_loss runs under BAdam's (the first one after BAdamMixin in the MRO)."""
    mro = type(trainer).__mro__
    start = mro.index(BAdamMixin) + 1 if BAdamMixin in mro else 0
    return next(cls for cls in mro[start:] if "compute_loss" in vars(cls))


def compute_loss_maybe_chunked(trainer, compute_loss, model, inputs, *args, **kwargs):
    """`compute_loss(model, inputs, ...)` (the Trainer's own), with the model's causal-LM loss computed in chunks
    of tokens when it can be (`integrations.chunked_loss`); everything else of the Trainer's loss is its own."""
    reason = _chunked_loss_off_reason(trainer, model, inputs)
    if reason is not None:
        if model.training and getattr(trainer, "_badam_chunk_note", None) != reason:
            trainer._badam_chunk_note = reason
            logger.info("BAdam: the training loss is the model's own (not chunked): %s.", reason)
        return compute_loss(model, inputs, *args, **kwargs)
    with chunked_causal_lm_loss(model, _trainer_badam_config(trainer).loss_chunk_tokens):
        return compute_loss(model, inputs, *args, **kwargs)


def install_chunked_loss(trainer: Trainer) -> None:
    """For a plain Trainer that got a BlockOptimizer (`--optim badam`): route its compute_loss through
    `compute_loss_maybe_chunked` (BAdamTrainer does it in its class). Once per trainer."""
    if isinstance(trainer, BAdamMixin) or getattr(trainer.compute_loss, "_badam_chunked", False):
        return
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        return compute_loss_maybe_chunked(trainer, original, model, inputs, *args, **kwargs)

    compute_loss._badam_chunked = True
    trainer.compute_loss = compute_loss


class BAdamMixin:
    """Makes a Trainer (sub)class train with BAdam. Settings come from `badam_config=` or from
    `args.optim_args` / `args.optim_target_modules`, and are checked against the model at construction."""

    def __init__(self, *args, badam_config: BAdamConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if badam_config is None:
            badam_config = BAdamConfig.from_optim_args(self.args.optim_args, self.args.optim_target_modules)
        self.badam_config = badam_config
        check_training_args(self.args)
        if getattr(self.args, "fp16", False):
            refuse_loss_scaling_with_inactive_update(badam_config)
        # Fail now, before any data is touched by train(): bad model, bad partition, bad start block.
        check_model(self.model)
        self._badam_partition = (self.model, partition_for(self.model, badam_config))
        schedule_for(self._badam_partition[1], badam_config)
        ensure_badam_callback(self)

    def _load_optimizer_and_scheduler(self, checkpoint):
        check_resume(self, checkpoint)
        return super()._load_optimizer_and_scheduler(checkpoint)

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

    def compute_loss(self, model, inputs, *args, **kwargs):
        return compute_loss_maybe_chunked(self, super().compute_loss, model, inputs, *args, **kwargs)


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
