"""Distributed glue.

Toggling `requires_grad` at a block switch is silently wrong under DDP, FSDP and DeepSpeed (blocks
unfrozen later are never synchronised or updated). Until each engine has its switching glue, more
than one process is refused instead of silently desynchronising.
"""

from __future__ import annotations

import os

import torch


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_single_process() -> None:
    n = world_size()
    if n > 1:
        raise RuntimeError(
            f"BAdam is running in {n} processes, but this version of badam_hf supports one process only: under "
            "DDP/FSDP/DeepSpeed a block unfrozen after wrapping is never synchronised, so ranks would silently "
            "diverge. Run on one GPU (the paper's 7B/8B setting) until multi-GPU support lands."
        )
