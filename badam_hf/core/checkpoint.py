"""The checkpoint format of `BlockOptimizer`, and the checks that a saved state belongs to this run.

`BlockOptimizer.state_dict()` is plain containers and tensors, so `torch.load(weights_only=True)` reads it:

    {"state": {index of the parameter in model.named_parameters(): {"master": its fp32 master (low-precision
               or sharded weights; a CPU copy), and the inner optimizer's state ("exp_avg", ...)}},
     "param_groups": [the decay group, the no-decay group] (hyperparameters; "params" as indices),
     "badam": {"version": STATE_VERSION, "step", "block", ...: where the schedule stands, and every setting
               the saved state's meaning depends on (blocks, mode, schedule, inner optimizer, shards)}}

Only the active block's parameters (and the always-active ones) have state. `load_state_dict` checks
everything before it changes anything, so a refused load leaves the optimizer as it was. The functions take
the optimizer (`opt`); engines add their own part through torch's state-dict hooks on it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .errors import CheckpointMismatchError
from .masters import is_sharded

# The layout of the "badam" entry and of "state". Bump it when a saved state would be read wrongly by the
# code that reads the current one; `check_state_dict` refuses any other version.
STATE_VERSION = 1


def to_host(t: torch.Tensor) -> torch.Tensor:
    return t.to("cpu")


def state_dict(opt, to_host: Callable[[torch.Tensor], Any] = to_host) -> dict[str, Any]:
    """The optimizer's state in the format above (without torch's state-dict hooks; see `BlockOptimizer`).

    The masters go to the CPU one at a time: held split between steps, each is rebuilt on the device, copied
    and freed before the next, so a save adds at most the largest one tensor's fp32 copy to the device (an fp32
    copy of the whole block, +4 bytes per parameter of it, if they were all rebuilt first). The moments are
    the live tensors (torch.save copies them to the file one at a time). `to_host`: the copy (the dry run,
    which has no host, passes one that keeps nothing)."""
    epoch, _, in_block = opt.schedule.position(opt.global_step)
    state: dict[int, dict[str, Any]] = {}
    for name in opt._trainable:
        entry = dict(opt.inner.state.get(opt._inner_tensor(name), {}))
        if name in opt._block_masters.masters:
            entry["master"] = to_host(opt._block_masters.value(name))
        if entry:
            state[opt._index[name]] = entry
    groups = [
        {k: v for k, v in g.items() if k != "params"} | {"params": [opt._index[n] for n in opt._group_names(i)]}
        for i, g in enumerate(opt.param_groups)
    ]
    badam = {
        "version": STATE_VERSION,
        "step": opt.global_step,
        "block": opt.active_block,
        "block_name": opt.active_block_name,
        "steps_in_block": in_block,
        "block_epoch": epoch,
        "order": list(opt.schedule.epoch_order(epoch)),
        "seed": opt.config.schedule.seed,
        "switch_every": opt.schedule.switch_every,
        "switch_mode": opt.schedule.mode,
        "block_names": opt.partition.names,
        "inner_optimizer": type(opt.inner).__name__,
        "shards": shards(opt),
        "mode": opt.mode,
        "active_blocks": list(opt.active_blocks),
        "mode_settings": mode_settings(opt),
        "skipped_steps": opt.skipped_steps,
    }
    return {"state": state, "param_groups": groups, "badam": badam}


def mode_settings(opt) -> dict[str, Any]:
    """What the saved masters' and moments' shapes depend on besides the partition (a resume must match)."""
    out: dict[str, Any] = {}
    if opt.mode == "ratio":
        out.update(update_ratio=opt.config.ratio.update_ratio, mask_mode=opt.config.ratio.mask_mode)
    if opt.mode == "lisa":
        out["lisa_layers"] = opt.config.lisa.lisa_layers
    return out


def shards(opt) -> int:
    """How many ranks the saved state is split over: the world size for sharded parameters, else 1."""
    if any(is_sharded(p) for p in opt._params.values()) and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def check_state_dict(opt, state_dict: dict[str, Any]) -> int:
    """Refuse a state that does not belong to this run (raises CheckpointMismatchError); returns the step it
    resumes at. Changes nothing."""
    badam = state_dict.get("badam")
    if badam is None:
        raise CheckpointMismatchError(
            "this optimizer state was not saved by badam_hf's BlockOptimizer (no 'badam' entry); "
            "start without resuming the optimizer or use a BAdam checkpoint."
        )
    check_version(badam)
    _check_run(opt, badam)
    step = int(badam["step"])
    block = opt.schedule.block_at(step)
    if block != badam["block"]:
        raise CheckpointMismatchError(
            f"the checkpoint's active block {badam['block']} does not follow from its step {step} under this "
            "run's schedule; resume with the same start_block and switch settings."
        )
    _check_entries(opt, state_dict["state"], step)
    return step


def check_version(badam: dict[str, Any]) -> None:
    """Only the current format is read. A state without a version is refused too: every state a
    BlockOptimizer has saved carries one, so its absence means another writer (or an edited file)."""
    version = badam.get("version")
    if type(version) is int and version == STATE_VERSION:
        return
    if version is None:
        raise CheckpointMismatchError(
            f"the checkpoint's BAdam state has no format version (this badam_hf reads version {STATE_VERSION}); "
            "it was not saved by badam_hf's BlockOptimizer. Start without resuming the optimizer."
        )
    if type(version) is int:
        when = "a newer" if version > STATE_VERSION else "an older"
        raise CheckpointMismatchError(
            f"the checkpoint's BAdam state has format version {version}, but this badam_hf reads version "
            f"{STATE_VERSION}; it was saved by {when} badam_hf. Resume with the badam_hf release that saved it, "
            "or start without resuming the optimizer."
        )
    raise CheckpointMismatchError(
        f"the checkpoint's BAdam state has format version {version!r}, not an integer (this badam_hf reads "
        f"version {STATE_VERSION}); start without resuming the optimizer."
    )


def _check_run(opt, badam: dict[str, Any]) -> None:
    """The saved run's blocks, settings and sharding are this run's."""
    if badam["block_names"] != opt.partition.names:
        raise CheckpointMismatchError(
            f"the checkpoint's blocks ({len(badam['block_names'])}, first {badam['block_names'][:2]}) differ "
            f"from this model's ({opt.num_blocks}, first {opt.partition.names[:2]}); resume with the same "
            "model and partition settings."
        )
    for key, mine in (
        ("mode", opt.mode),
        ("mode_settings", mode_settings(opt)),
        ("switch_every", opt.schedule.switch_every),
        ("switch_mode", opt.schedule.mode),
        ("seed", opt.config.schedule.seed),
        ("inner_optimizer", type(opt.inner).__name__),  # its moments mean nothing to another optimizer
    ):
        saved = badam.get(key, {"mode": "layer", "mode_settings": {}}.get(key))  # older checkpoints: layer mode
        if saved != mine:
            raise CheckpointMismatchError(
                f"the checkpoint was saved with {key}={saved!r} but this run has {key}={mine!r}."
            )
    if badam.get("shards", 1) != shards(opt):
        raise CheckpointMismatchError(
            f"the checkpoint's optimizer state is split over {badam.get('shards', 1)} rank(s) (FSDP2 shards) but "
            f"this run has {shards(opt)}; resume with the same number of processes and the same sharding."
        )


def _check_entries(opt, saved_state: dict[int, dict[str, Any]], step: int) -> None:
    """State exists only for parameters trained at `step`, with a master exactly where this run needs one."""
    will_train = {n for b in opt.schedule.active_at(step) for n in opt.partition.blocks[b].param_names}
    will_train |= set(opt.partition.always_active)
    stray = [i for i in saved_state if opt._names[int(i)] not in will_train]
    if stray:
        raise CheckpointMismatchError(
            f"the checkpoint has optimizer state for inactive parameter {opt._names[int(stray[0])]!r}."
        )
    # Masters exist exactly for low-precision (or sharded) weights: another dtype would lose the moments.
    odd = [i for i, e in saved_state.items() if ("master" in e) != opt._block_masters.needs_master(opt._names[int(i)])]
    if odd:
        name = opt._names[int(odd[0])]
        has = "holds" if "master" in saved_state[odd[0]] else "lacks"
        raise CheckpointMismatchError(
            f"the checkpoint {has} an fp32 master for {name!r}, but this run's weight is "
            f"{opt._params[name].dtype} and needs {'none' if has == 'holds' else 'one'}; resume with the weights' "
            "dtype of the saved run."
        )


def load_state_dict(opt, state_dict: dict[str, Any]) -> None:
    """Check `state_dict`, then move `opt` to its step with its masters, moments and hyperparameters."""
    # Validate everything before changing anything, so a refused load leaves the optimizer as it was.
    step = opt.check_state_dict(state_dict)
    for group, saved in zip(opt.param_groups, state_dict["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})
    opt.seek(step)
    opt.loaded_step = step
    opt.skipped_steps = int(state_dict["badam"].get("skipped_steps", 0))

    saved_state = state_dict["state"]
    if any("master" in entry for entry in saved_state.values()):
        opt._materialize_masters()
    with torch.no_grad():
        for i, entry in saved_state.items():
            name = opt._names[int(i)]
            if "master" in entry:
                opt._block_masters.masters[name].copy_(entry["master"])
    opt._block_masters.store()  # as after the step that wrote this checkpoint (mid-block: it had masters)
    # Let torch.optim place and cast the moments: rebuild the inner state dict in its own format.
    order = [opt._inner_tensor(n) for g in range(2) for n in opt._group_names(g)]
    position = {id(t): k for k, t in enumerate(order)}
    inner_sd = opt.inner.state_dict()
    inner_sd["state"] = {}
    for i, entry in saved_state.items():
        moments = {k: v for k, v in entry.items() if k != "master"}
        if moments:
            inner_sd["state"][position[id(opt._inner_tensor(opt._names[int(i)]))]] = moments
    opt.inner.load_state_dict(inner_sd)
