"""badam_hf: BAdam (block-coordinate Adam) for Hugging Face Trainer.

Importing the package registers `--optim badam` with transformers.
"""

from .config import BAdamConfig, BAdamConfigError, PartitionConfig, ScheduleConfig
from .optim_registry import register as _register
from .optimizer import BlockOptimizer
from .partition import Partition, partition_model
from .trainer import BAdamCallback, BAdamMixin, BAdamTrainer, make_badam_trainer

__version__ = "0.1.0"

_register()

__all__ = [
    "BAdamCallback",
    "BAdamConfig",
    "BAdamConfigError",
    "BAdamMixin",
    "BAdamTrainer",
    "BlockOptimizer",
    "Partition",
    "PartitionConfig",
    "ScheduleConfig",
    "make_badam_trainer",
    "partition_model",
]
