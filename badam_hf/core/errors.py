"""One family of errors. Each also derives from the builtin it was before, so `except ValueError` and
`except RuntimeError` clauses in users' code keep working; `except BAdamError` catches them all."""

from __future__ import annotations


class BAdamError(Exception):
    """Base of every error badam_hf raises on purpose (a refusal, with the reason and the fix)."""


class BAdamConfigError(BAdamError, ValueError):
    """Invalid BAdam settings, or a model/partition they cannot apply to; raised before training."""


class CheckpointMismatchError(BAdamError, ValueError):
    """An optimizer checkpoint that does not belong to this run (other blocks, schedule, shards, engine)."""


class DistributedSetupError(BAdamError, RuntimeError):
    """BAdam cannot train correctly under this distributed setup; raised before any step is taken."""


class RecipeError(BAdamError, ValueError):
    """A recipe (YAML file or overrides) that cannot run; the message names the key and the valid choices.

    `problems` lists every problem found when several were collected at once (`badam-hf train --check`)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems else [message]


class UnsupportedVersionError(BAdamError, RuntimeError):
    """An installed transformers / accelerate lacks something badam_hf changes (a function was renamed or
    moved): raised at `import badam_hf`, or, for an optional engine's (FSDP2, DeepSpeed), when that engine is
    used. The message names the missing target and the versions badam_hf was tested with."""


class CheckpointReadError(BAdamError, ValueError):
    """An optimizer checkpoint file that cannot be read (empty, truncated, not a torch file); names the file."""


class NonFiniteGradientError(BAdamError, RuntimeError):
    """Training stopped: `max_skipped_steps` optimizer steps in a row had inf/NaN gradients."""


class ClosedOptimizerError(BAdamError, RuntimeError):
    """A `BlockOptimizer` used after `close()` (a newer BlockOptimizer built on its model closes it)."""
