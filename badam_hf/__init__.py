"""badam_hf: BAdam (block-coordinate Adam) for Hugging Face Trainer.

Importing the package plugs the distributed engines into `BlockOptimizer` and registers `--optim badam`
with transformers. Layout (each package may import only those before it):
core (the algorithm) <- engines (DDP, FSDP2, DeepSpeed) <- integrations (Trainer, patches) <- data,
recipes, tools.
"""

from .core import (
    BAdamConfig,
    BAdamConfigError,
    BAdamError,
    BlockOptimizer,
    CheckpointMismatchError,
    DistributedSetupError,
    Partition,
    PartitionConfig,
    RecipeError,
    ScheduleConfig,
    UnsupportedVersionError,
    partition_model,
)
from .engines import dispatch as _dispatch
from .integrations import patches as _patches
from .integrations.trainer import BAdamCallback, BAdamMixin, BAdamTrainer, make_badam_trainer

__version__ = "0.1.0"

_dispatch.install()
_patches.install()

__all__ = [
    "BAdamCallback",
    "BAdamConfig",
    "BAdamConfigError",
    "BAdamError",
    "BAdamMixin",
    "BAdamTrainer",
    "BlockOptimizer",
    "CheckpointMismatchError",
    "DistributedSetupError",
    "Partition",
    "PartitionConfig",
    "RecipeError",
    "ScheduleConfig",
    "UnsupportedVersionError",
    "make_badam_trainer",
    "partition_model",
]
