"""Documented path kept for users' code: the DeepSpeed ZeRO-3 glue (see `badam_hf.engines.deepspeed`)."""

from .engines.deepspeed import (
    ALLOW_UNTESTED_ENV,
    DeepSpeedBlockSync,
    attach_deepspeed,
    check_config,
    check_training_args,
    check_version,
)

__all__ = [
    "ALLOW_UNTESTED_ENV",
    "DeepSpeedBlockSync",
    "attach_deepspeed",
    "check_config",
    "check_training_args",
    "check_version",
]
