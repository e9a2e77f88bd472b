"""Experimental: BAdam under DeepSpeed ZeRO stage 3 (tested with deepspeed >=0.19,<0.20).

Why glue is needed. ZeRO-3 builds its bookkeeping once, in `deepspeed.initialize`, from the parameters
that require grad at that moment: the flat fp32 master partitions, the gradient partition buffers and the
backward hooks that reduce-scatter gradients. BAdam changes the trainable set at every block switch, so
with a plain `requires_grad` toggle the blocks visited later are never reduced nor updated (silently), and
ZeRO-1/2 fail in their gradient buckets. `attach_deepspeed` makes it work:

- DeepSpeed owns the fp32 master partitions. It calls the client optimizer's `step()` once per
  sub-group, with the client's param groups temporarily holding that sub-group's flat fp32 partition
  (and its grad). In this mode `BlockOptimizer.step()` only runs its inner optimizer (AdamW, SGD, ...)
  over those partitions: no masters of its own, and it does not count steps.
- The step count (and the block schedule) advances once per optimizer step, as the Trainer's does. A step
  DeepSpeed skips (ZeRO-3 skips every step whose gradient norm is inf/NaN, in bf16 too) leaves the fp32
  partitions and moments untouched and counts as one of BAdam's skipped steps (`skip_nonfinite`, which
  cannot be turned off here: `skip_nonfinite=false` is refused).
- At a switch the old block's fp32 partitions, gradient buffers, hooks and inner-optimizer state are
  dropped, `requires_grad` follows the new block, and the ZeRO-3 optimizer's per-trainable-set bookkeeping
  is rebuilt for the new block (the same private DeepSpeed methods `__init__` uses; each rank does it at
  the same step, and a tiny all-reduce checks that all ranks switch to the same block). A switch costs a
  few hundred milliseconds on a small model; between switches DeepSpeed runs unchanged.

Refused with `DistributedSetupError` (before training): ZeRO stage 0/1/2, a DeepSpeed config with its own
"optimizer" block (DeepSpeed or the Trainer would silently train with it instead of BAdam), fp16 (use
bf16), parameter offload and NVMe optimizer offload (optimizer offload to "cpu" works, with
"zero_force_ds_cpu_optimizer": false), always-active parameters (their moments cannot survive the
per-block rebuild), and a DeepSpeed version outside the tested range (set BADAM_ALLOW_UNTESTED_DEEPSPEED=1
to turn that refusal into a warning; the private methods are still checked by name).

Checkpoints: DeepSpeed's own (`engine.save_checkpoint` / `engine.load_checkpoint`, what the Trainer uses
under DeepSpeed) save the active block's fp32 partitions and, per rank, the frozen parameters; BAdam adds
its step and the inner-optimizer state of the partitions. DeepSpeed can only load a checkpoint whose
frozen/trainable split matches the engine's, so before a load the glue moves to the saved block: through
the wrapped `engine.load_checkpoint` (plain loop, after `attach_deepspeed`) and, for the Trainer, which
loads right after `deepspeed.initialize`, through a wrapper of `transformers.trainer.deepspeed_load_checkpoint`
that attaches first. A resumed run then continues exactly as an uninterrupted one.

Plain loop (the config needs "zero_optimization": {"stage": 3} and "zero_allow_untested_optimizer": true,
which the Trainer sets by itself; note that DeepSpeed clips gradients at norm 1.0 unless
"gradient_clipping" says otherwise):

    opt = BlockOptimizer(model, lr=1e-5, switch_every=50)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    attach_deepspeed(engine, opt)
    for batch in loader:
        loss = engine(**batch).loss; engine.backward(loss); engine.step()

Hugging Face Trainer (`BAdamTrainer` or `--optim badam` with `--deepspeed configs/deepspeed_zero3.json`):
nothing to do; `BAdamCallback` attaches the DeepSpeed engine at train begin.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from typing import Any

import torch

from ..core.checkpoint import check_version as check_state_version
from ..core.errors import CheckpointMismatchError
from .common import (
    DistributedSetupError,
    check_same_block,
    detach_sync,
    engine_sync,
    check_mode_supported,
    install_sync,
    read_optimizer_state,
    require_block_optimizer,
    world_size,
)

TESTED_RANGE = ((0, 19), (0, 20))  # >=0.19, <0.20
TESTED_RANGE_TEXT = ">=0.19,<0.20"
ALLOW_UNTESTED_ENV = "BADAM_ALLOW_UNTESTED_DEEPSPEED"

# The ZeRO-3 optimizer internals the per-block rebuild uses (present in deepspeed 0.19; see its __init__).
_ZERO3_METHODS = (
    "_get_trainable_parameter_groups",
    "_create_fp16_partitions_with_defragmentation",
    "_setup_for_real_optimizer",
    "set_grad_positions",
    "create_reduce_and_remove_grad_hooks",
    "get_param_id",
    "_get_param_coordinator",
    "_partition_all_parameters",
    "step",
)
# Per-trainable-set lists that ZeRO-3's __init__ builds; emptied at a switch and built again for the new block.
_PER_BLOCK_LISTS = (
    "fp16_groups",
    "fp16_partitioned_groups",
    "fp16_partitioned_groups_flat",
    "fp16_partitioned_groups_flat_numel",
    "fp16_partitioned_groups_flat_id",
    "fp32_partitioned_groups_flat",
    "next_swappable_fp32_partitioned_groups",
    "groups_padding",
    "sub_group_process_groups",
    "sub_group_partition_counts",
)
_ZERO3_ATTRIBUTES = (
    "optimizer",
    *_PER_BLOCK_LISTS,
    "sub_group_to_group_id",
    "trainable_param_groups",
    "param_dict",
    "params_already_reduced",
    "averaged_gradients",
    "grad_position",
    "_grad_acc_hooks",
    "_leaf_module_hooks",
    "overflow",
    "offload_optimizer",
    "offload_param",
)


# --- version and configuration checks ---------------------------------------------------------------


def _parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_version(version: str | None = None) -> str:
    """Refuse a DeepSpeed version outside the tested range (a warning with BADAM_ALLOW_UNTESTED_DEEPSPEED=1)."""
    if version is None:
        try:
            import deepspeed
        except ImportError:
            raise DistributedSetupError("DeepSpeed is configured but cannot be imported; pip install 'deepspeed"
                                        f"{TESTED_RANGE_TEXT}'.") from None
        version = deepspeed.__version__
    low, high = TESTED_RANGE
    if not (low <= _parse_version(version)[:2] < high):
        message = (
            f"BAdam's DeepSpeed ZeRO-3 support relies on DeepSpeed internals and is tested with deepspeed"
            f"{TESTED_RANGE_TEXT}, but deepspeed {version} is installed. Install a tested version (pip install "
            f"'deepspeed{TESTED_RANGE_TEXT}'), or set {ALLOW_UNTESTED_ENV}=1 to try this one at your own risk."
        )
        if os.environ.get(ALLOW_UNTESTED_ENV, "").lower() in ("1", "true", "yes"):
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        else:
            raise DistributedSetupError(message)
    return version


def _offload_device(section: Any) -> str:
    if not isinstance(section, dict):
        return "none"
    return str(section.get("device", "none") or "none").lower()


# Each refusal is written once; the config checks (before training) and the engine checks (at attach) share them.


def _refuse_optimizer_block(kind: str, source: str):
    raise DistributedSetupError(
        f"{source} has an \"optimizer\" block ({kind!r}); with it DeepSpeed (and the Hugging Face Trainer) would "
        "train with that optimizer instead of BAdam. Remove the \"optimizer\" block (a \"scheduler\" block is "
        "fine): whatever it names, remove it, since BAdam must be the optimizer."
    )


def _refuse_stage(stage, source: str):
    raise DistributedSetupError(
        f"{source} runs ZeRO stage {stage} (zero_optimization.stage={stage!r}); BAdam supports DeepSpeed only with "
        "ZeRO stage 3 (its partitions can be rebuilt at each block switch; stages 0-2 keep flat buffers built "
        "once). Use \"stage\": 3, or DistributedDataParallel without DeepSpeed."
    )


def _refuse_fp16(source: str):
    raise DistributedSetupError(
        f"{source} enables fp16; BAdam supports bf16 (\"bf16\": {{\"enabled\": true}} or \"auto\") or fp32 under "
        "DeepSpeed."
    )


def _refuse_param_offload(device: str, source: str):
    raise DistributedSetupError(
        f"{source} sets zero_optimization.offload_param.device={device!r}; BAdam under DeepSpeed does not support "
        "parameter offload (after a block switch the offloaded copies of earlier blocks keep being updated). "
        "Remove offload_param or set its device to \"none\"."
    )


def _refuse_optimizer_offload(device: str, source: str):
    raise DistributedSetupError(
        f"{source} sets zero_optimization.offload_optimizer.device={device!r}; BAdam under DeepSpeed supports "
        "optimizer offload to \"cpu\" only (BAdam keeps just the active block's optimizer state)."
    )


def check_config(config: dict | str | os.PathLike | None, source: str = "the DeepSpeed config") -> None:
    """Refuse DeepSpeed settings BAdam cannot train with (stage, "optimizer" block, fp16, offload)."""
    if config is None:
        return
    if not isinstance(config, dict):
        with open(config) as f:
            config = json.load(f)
    if "optimizer" in config:
        block = config["optimizer"]
        _refuse_optimizer_block(block.get("type", "?") if isinstance(block, dict) else "?", source)
    zero = config.get("zero_optimization")
    zero = zero if isinstance(zero, dict) else {}
    stage = zero.get("stage", 0)
    if stage != 3:
        _refuse_stage(stage, source)
    fp16 = config.get("fp16") or {}
    if isinstance(fp16, dict) and fp16.get("enabled") not in (None, False, "false", "auto"):
        _refuse_fp16(source)
    device = _offload_device(zero.get("offload_param"))
    if device != "none":
        _refuse_param_offload(device, source)
    device = _offload_device(zero.get("offload_optimizer"))
    if device not in ("none", "cpu"):
        _refuse_optimizer_offload(device, source)
    if device == "cpu" and config.get("zero_force_ds_cpu_optimizer", True) not in (False, "false"):
        raise DistributedSetupError(
            f"{source} offloads the optimizer to the CPU, where DeepSpeed insists on its own CPU Adam unless "
            "\"zero_force_ds_cpu_optimizer\": false is set; set it, so BAdam (the client optimizer) runs the "
            "offloaded step."
        )


def _hf_deepspeed_config() -> dict | None:
    """The config of the DeepSpeed run the Hugging Face TrainingArguments set up, if any."""
    try:
        from transformers.integrations.deepspeed import deepspeed_config
    except ImportError:
        return None
    try:
        return deepspeed_config()
    except Exception:  # pragma: no cover - no HF DeepSpeed config alive
        return None


def check_training_args(args) -> None:
    """For the Trainer: refuse a `TrainingArguments(deepspeed=...)` setup BAdam cannot train with."""
    hf_config = getattr(args, "hf_deepspeed_config", None)
    config = getattr(hf_config, "config", None)
    if config is None and getattr(args, "deepspeed", None):
        config = args.deepspeed
    if config is None:
        return
    check_version()
    check_config(config, source="the DeepSpeed config (TrainingArguments.deepspeed)")


def check_construction(model) -> None:
    """Called when a BlockOptimizer is built under DeepSpeed (the construction check in `engines.dispatch`)."""
    check_version()
    hf_config = _hf_deepspeed_config()
    check_config(hf_config, source="the DeepSpeed config (TrainingArguments.deepspeed)")


# --- the engine glue ----------------------------------------------------------------------------------


def _check_internals(zero_opt) -> None:
    missing = [a for a in _ZERO3_METHODS if not callable(getattr(zero_opt, a, None))]
    missing += [a for a in _ZERO3_ATTRIBUTES if not hasattr(zero_opt, a)]
    if missing:
        import deepspeed

        raise DistributedSetupError(
            f"this DeepSpeed version ({deepspeed.__version__}) changed the ZeRO-3 internals BAdam rebuilds at each "
            f"block switch (missing: {', '.join(missing)}). Training anyway would leave later blocks untrained, so "
            f"it is refused. Use deepspeed{TESTED_RANGE_TEXT}."
        )


def _check_engine(engine) -> None:
    source = "the DeepSpeed engine"
    stage = engine.zero_optimization_stage()
    if stage != 3:
        _refuse_stage(stage, source)
    optimizer_name = getattr(getattr(engine, "_config", None), "optimizer_name", None)
    if optimizer_name is not None:
        _refuse_optimizer_block(optimizer_name, "the DeepSpeed config")
    if engine.fp16_enabled():
        _refuse_fp16(source)
    if engine.zero_offload_param():
        device = getattr(engine.zero_offload_param(), "device", "cpu")
        _refuse_param_offload(str(getattr(device, "value", device)), source)
    if engine.zero_offload_optimizer() and getattr(engine.optimizer, "swap_optimizer", False):
        _refuse_optimizer_offload("nvme", source)


class DeepSpeedBlockSync:
    """Switch hook and step counter that keep a ZeRO-3 optimizer on BAdam's active block."""

    engine_name = "DeepSpeed ZeRO-3"

    def __init__(self, engine, zero_opt, opt, check_agreement: bool = True):
        self.engine = engine
        self.zero_opt = zero_opt
        self.opt = opt
        self.check_agreement = check_agreement
        self.rebuilds = 0
        self.last_rebuild_ms = 0.0
        self.total_rebuild_ms = 0.0
        self._original_step = None
        self._driver_handle = None

    # -- driven by DeepSpeed --------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """`BlockOptimizer.step()` under ZeRO-3: DeepSpeed put one sub-group's flat fp32 partition (with its
        grad) into the client's param groups; run the inner optimizer on exactly that, count nothing."""
        opt = self.opt
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        opt.sync_hyperparameters()
        for outer, inner in zip(opt.param_groups, opt.inner.param_groups):
            inner["params"][:] = list(outer["params"])
        try:
            opt.inner.step()
        finally:
            for inner in opt.inner.param_groups:
                inner["params"][:] = []
        return loss

    def _install_step_wrapper(self) -> None:
        zero_opt = self.zero_opt
        current = zero_opt.step
        previous = getattr(current, "_badam_sync", None)
        if previous is not None:  # attached before: wrap the original, not the old wrapper
            current = previous._original_step
        self._original_step = current

        def step(*args, **kwargs):
            out = self._original_step(*args, **kwargs)
            # DeepSpeed skipped a step with an inf/NaN gradient norm (all ranks agree: the norm is all-reduced):
            # BAdam's skip, counted as such; it still counts towards K, like the Trainer's step count.
            self.opt.note_step(skipped=bool(getattr(zero_opt, "overflow", False)))
            self.after_step()
            return out

        step._badam_sync = self
        zero_opt.step = step

    def _install_load_wrapper(self) -> None:
        engine = self.engine
        current = engine.load_checkpoint
        previous = getattr(current, "_badam_sync", None)
        original = previous._original_load if previous is not None else current
        self._original_load = original

        def load_checkpoint(load_dir, tag=None, *args, **kwargs):
            self.prepare_resume(load_dir, tag)
            return self._original_load(load_dir, tag, *args, **kwargs)

        load_checkpoint._badam_sync = self
        engine.load_checkpoint = load_checkpoint

    def after_step(self) -> None:
        self.opt.advance()  # a switch toggles requires_grad, then calls the switch hooks (self.rebuild)

    # -- the switch ---------------------------------------------------------------------------------------

    def __call__(self, opt) -> None:
        if self.check_agreement and torch.distributed.is_initialized() and world_size() > 1:
            check_same_block(opt)
        self.rebuild()

    @torch.no_grad()
    def rebuild(self) -> None:
        """Rebuild the ZeRO-3 optimizer's trainable-set bookkeeping for the parameters that require grad now."""
        z = self.zero_opt
        opt = self.opt
        start = time.perf_counter()
        # 0. Every parameter back to its partition (after a step they already are).
        z._partition_all_parameters()
        # 1. Drop the old block's hooks, fp32 partitions, grad buffers and inner-optimizer state.
        for handle in list(z._grad_acc_hooks) + list(z._leaf_module_hooks):
            handle.remove()
        z._grad_acc_hooks.clear()
        z._leaf_module_hooks.clear()
        opt.clear_block_state()
        for name in _PER_BLOCK_LISTS:
            setattr(z, name, [])
        z.sub_group_to_group_id = {}
        z.param_dict = {}
        z.params_already_reduced = {}
        z.averaged_gradients = {}
        z.grad_position = {}
        z.grad_partitions_flat_buffer = None
        if hasattr(z, "norm_for_param_grads"):  # optimizer offload: per-parameter grad norms of the old block
            z.norm_for_param_grads = {}
        for bucket in getattr(z, "ipg_buckets", {}).values():
            bucket.clear_params()
            if getattr(z, "contiguous_gradients", False):
                bucket.buffer = None  # reallocated below; free the old one first (no 2x peak)
        # 2. The client's groups hold the model parameters of the new block (BlockOptimizer._activate put them
        #    there); DeepSpeed reads them, as in its __init__, and empties them again.
        z.trainable_param_groups = z._get_trainable_parameter_groups()
        z._create_fp16_partitions_with_defragmentation(z.trainable_param_groups)
        for group in z.fp16_groups:
            for param in group:
                pid = z.get_param_id(param)
                z.param_dict[pid] = param
                z.params_already_reduced[pid] = False
        z._setup_for_real_optimizer()
        z.set_grad_positions()
        if hasattr(z, "debug_fp16_grads"):
            z.debug_fp16_grads = [{} for _ in z.fp16_groups]
        z.create_reduce_and_remove_grad_hooks()
        coordinator = z._get_param_coordinator()
        if hasattr(coordinator, "is_invalid_trace") and not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()  # the backward now runs over other modules
        self.rebuilds += 1
        self.last_rebuild_ms = (time.perf_counter() - start) * 1000.0
        self.total_rebuild_ms += self.last_rebuild_ms

    # -- checkpoints ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The engine part of `BlockOptimizer.state_dict()`: the inner optimizer's state of this rank's fp32
        partitions (DeepSpeed saves the partitions themselves, one file per rank)."""
        z = self.zero_opt
        flats = list(z.fp32_partitioned_groups_flat)
        return {
            "trainable": self.opt.trainable_names,
            "sub_group_numel": [int(f.numel()) for f in flats],
            "inner_state": [dict(self.opt.inner.state.get(f, {})) for f in flats],
            "world_size": world_size(),
        }

    # torch's state-dict hooks on the BlockOptimizer carry this part in and out of its checkpoints.

    def _state_dict_post_hook(self, opt, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict["engine"] = self.state_dict()
        return state_dict

    def _load_pre_hook(self, opt, state_dict: dict[str, Any]) -> None:
        if "badam" in state_dict:  # else the BlockOptimizer refuses it with its own message
            self.check_state_dict(state_dict)  # before anything changes
            self._pending_load = state_dict["engine"]

    def _load_post_hook(self, opt) -> None:
        saved, self._pending_load = self._pending_load, None
        if saved is not None:
            self.load_state_dict(saved)

    def install_hooks(self) -> None:
        opt = self.opt
        self._pending_load = None
        self._handles = [
            opt.register_state_dict_post_hook(self._state_dict_post_hook),
            opt.register_load_state_dict_pre_hook(self._load_pre_hook),
            opt.register_load_state_dict_post_hook(self._load_post_hook),
        ]

    def detach(self) -> None:
        """Undo `attach_deepspeed` on the optimizer (its checkpoint hooks and the driver)."""
        for handle in getattr(self, "_handles", []):
            handle.remove()
        self._handles = []
        if self._driver_handle is not None:
            self._driver_handle.remove()
            self._driver_handle = None

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "badam" in state_dict:  # the format version first: another version may lack the fields read below
            check_state_version(state_dict["badam"])
        saved = state_dict.get("engine")
        if not isinstance(saved, dict) or "inner_state" not in saved:
            raise CheckpointMismatchError(
                "this optimizer state was not saved under DeepSpeed ZeRO-3 (no 'engine' entry); resume a DeepSpeed "
                "run from a DeepSpeed checkpoint (engine.save_checkpoint / the Trainer's checkpoints)."
            )
        if saved["world_size"] != world_size():
            raise CheckpointMismatchError(
                f"the checkpoint was saved by {saved['world_size']} DeepSpeed ranks but this run has {world_size()}; "
                "resume BAdam under ZeRO-3 with the same number of processes."
            )
        opt = self.opt
        block = opt.schedule.block_at(int(state_dict["badam"]["step"]))
        expected = list(opt.partition.blocks[block].param_names) + list(opt.partition.always_active)
        if saved["trainable"] != expected:
            raise CheckpointMismatchError("the checkpoint's trainable parameters differ from the block its step selects.")

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """After `BlockOptimizer.load_state_dict` moved to the saved block (and so rebuilt ZeRO-3's layout):
        put the saved inner-optimizer state on this rank's new fp32 partitions (DeepSpeed then copies the
        saved partitions' values into them)."""
        z = self.zero_opt
        flats = list(z.fp32_partitioned_groups_flat)
        numel = [int(f.numel()) for f in flats]
        if numel != saved["sub_group_numel"]:
            raise CheckpointMismatchError(
                f"the checkpoint's ZeRO-3 partitions ({saved['sub_group_numel']}) do not fit this run's ({numel}); "
                "resume with the same DeepSpeed sub_group_size and number of processes."
            )
        self.opt.inner.state.clear()
        for flat, entry in zip(flats, saved["inner_state"]):
            if entry:
                self.opt.inner.state[flat] = {
                    k: (v.to(device=flat.device, copy=True) if torch.is_tensor(v) and v.dim() > 0 else v)
                    for k, v in entry.items()
                }

    def _saved_step(self, load_dir, tag) -> int | None:
        """The BAdam step stored in this rank's ZeRO checkpoint file (read lazily with mmap), if any."""
        import glob

        if tag is None:
            latest = os.path.join(load_dir, "latest")
            if not os.path.isfile(latest):
                return None
            with open(latest) as f:
                tag = f.read().strip()
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        files = sorted(glob.glob(os.path.join(load_dir, str(tag), f"*zero_pp_rank_{rank}_mp_rank_*_optim_states.pt")))
        if not files:
            return None
        sd = read_optimizer_state(files[0], mmap=True, weights_only=False, fix="start afresh from its model weights "
                                  "alone (load the checkpoint folder as the model, without resume_from_checkpoint).")
        client = sd.get("optimizer_state_dict", {}).get("optimizer_state_dict", {})
        badam = client.get("badam") if isinstance(client, dict) else None
        return None if badam is None else int(badam["step"])

    def prepare_resume(self, load_dir, tag=None) -> None:
        """Before DeepSpeed loads a checkpoint: move to the block that was training when it was saved, so
        DeepSpeed's layout (which parameters are frozen, the fp32 partitions) matches the saved one."""
        step = self._saved_step(load_dir, tag)
        if step is not None:
            self.opt.seek(step)


def _zero3_optimizer(engine):
    zero_opt = getattr(engine, "optimizer", None)
    if zero_opt is None or "DeepSpeedZeroOptimizer_Stage3" not in {c.__name__ for c in type(zero_opt).__mro__}:
        _refuse_stage(engine.zero_optimization_stage(), f"the DeepSpeed engine (optimizer {type(zero_opt).__name__})")
    return zero_opt


def attach_deepspeed(engine, optimizer, check_agreement: bool = True) -> DeepSpeedBlockSync:
    """Make a DeepSpeed ZeRO-3 engine, built with `optimizer=BlockOptimizer(...)`, train block by block.
    Call once after `deepspeed.initialize`; idempotent. Returns the switch hook (rebuild timings)."""
    opt = require_block_optimizer(optimizer, "attach_deepspeed")
    check_version()
    _check_engine(engine)
    zero_opt = _zero3_optimizer(engine)
    if zero_opt.optimizer is not opt:
        raise DistributedSetupError(
            f"the DeepSpeed engine does not train with this BlockOptimizer (its client optimizer is "
            f"{type(zero_opt.optimizer).__name__}); pass it as deepspeed.initialize(..., optimizer=opt) and make "
            "sure the DeepSpeed config has no \"optimizer\" block."
        )
    _check_internals(zero_opt)
    check_mode_supported(opt, "DeepSpeed ZeRO-3")
    if not opt.config.skip_nonfinite:
        raise DistributedSetupError(
            "skip_nonfinite=false cannot be honoured under DeepSpeed ZeRO-3: DeepSpeed itself skips every step whose "
            "gradient norm is inf/NaN (BAdam counts those as skipped steps and stops after max_skipped_steps in a "
            "row). Leave skip_nonfinite unset there."
        )
    if opt.partition.always_active:
        raise DistributedSetupError(
            f"always-active parameters ({opt.partition.always_active[0]!r}, ...) are not supported under DeepSpeed "
            "ZeRO-3 yet: their optimizer state would restart at every block switch. Put those modules in the "
            "blocks (always_active=[] and a partition that covers them), or use DistributedDataParallel."
        )
    current = engine_sync(opt)
    if isinstance(current, DeepSpeedBlockSync) and current.engine is engine:
        return current
    detach_sync(opt)  # an earlier engine's hook must not fire during the re-activation below
    if isinstance(current, DeepSpeedBlockSync):
        current.detach()
    sync = DeepSpeedBlockSync(engine, zero_opt, opt, check_agreement=check_agreement)
    # DeepSpeed owns the fp32 masters and drives the step. attach_driver also puts back BAdam's two groups
    # (decay / no decay), which DeepSpeed dropped at initialize because they were empty, and re-activates the
    # current block from scratch in DeepSpeed's layout (dropping masters built before the engine existed).
    sync._driver_handle = opt.attach_driver(sync)
    sync.install_hooks()
    install_sync(opt, sync)  # runs it once now; the first-step guard sees it attached
    sync._install_step_wrapper()
    sync._install_load_wrapper()
    return sync


def is_deepspeed_engine(obj) -> bool:
    return "DeepSpeedEngine" in {c.__name__ for c in type(obj).__mro__}


def refuse_unattached(opt) -> None:
    """Called at the first step of a BlockOptimizer that DeepSpeed drives without `attach_deepspeed`."""
    raise DistributedSetupError(
        "this BlockOptimizer is stepped by a DeepSpeed engine it was not attached to, so block switches would be "
        "lost (later blocks silently untrained). Call `badam_hf.deepspeed_zero3.attach_deepspeed(engine, "
        "optimizer)` after deepspeed.initialize (the Hugging Face Trainer does this through BAdamCallback)."
    )
