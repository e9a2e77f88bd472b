"""Documented path kept for users' code: the FSDP2 glue (see `badam_hf.engines.fsdp2`)."""

from .engines.fsdp2 import FSDP2BlockSync, attach_fsdp2, load_sharded_optimizer, save_sharded_optimizer

__all__ = ["FSDP2BlockSync", "attach_fsdp2", "load_sharded_optimizer", "save_sharded_optimizer"]
