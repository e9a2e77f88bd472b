"""Documented path kept for users' code: the DDP glue and the engine checks (see `badam_hf.engines`)."""

from .engines.common import DistributedSetupError, engine_of, engine_sync, world_size
from .engines.ddp import DDPBlockSync, attach_ddp
from .engines.dispatch import attach_wrapped_model, check_engine

__all__ = [
    "DDPBlockSync",
    "DistributedSetupError",
    "attach_ddp",
    "attach_wrapped_model",
    "check_engine",
    "engine_of",
    "engine_sync",
    "world_size",
]
