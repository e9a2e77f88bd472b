"""The algorithm, engine-free: settings, partitioning, the block schedule, backward truncation, fp32 masters
and `BlockOptimizer`. Imports only from `badam_hf.core` and third-party packages; engines plug in through
the optimizer's extension points (see `badam_hf.core.extension_points`)."""

from .config import BAdamConfig, PartitionConfig, ScheduleConfig
from .errors import (
    BAdamConfigError,
    BAdamError,
    CheckpointMismatchError,
    DistributedSetupError,
    RecipeError,
    UnsupportedVersionError,
)
from .optimizer import BlockOptimizer, unwrap_optimizer
from .partition import Partition, partition_model
from .schedule import BlockSchedule

__all__ = [
    "BAdamConfig",
    "BAdamConfigError",
    "BAdamError",
    "BlockOptimizer",
    "BlockSchedule",
    "CheckpointMismatchError",
    "DistributedSetupError",
    "Partition",
    "PartitionConfig",
    "RecipeError",
    "ScheduleConfig",
    "UnsupportedVersionError",
    "partition_model",
    "unwrap_optimizer",
]
