"""The block schedule: which block is active after `t` optimizer steps.

It is a pure function of `t`, so a resumed run, a callback and the optimizer always agree on the active
block without replaying history. Every block gets exactly `switch_every` steps, the first one included.
"""

from __future__ import annotations

import torch

from .config import ScheduleConfig
from .errors import BAdamConfigError


class BlockSchedule:
    def __init__(self, num_blocks: int, config: ScheduleConfig):
        if num_blocks < 1:
            raise BAdamConfigError("the partition has no blocks.")
        start = config.start_block
        if start is not None and start >= num_blocks:
            raise BAdamConfigError(
                f"start_block={start} is out of range; the model has {num_blocks} blocks (0..{num_blocks - 1})."
            )
        self.num_blocks = num_blocks
        self.config = config
        self.switch_every = config.switch_every
        self.mode = config.switch_mode
        if start is None:
            start = num_blocks - 1 if self.mode == "descending" else 0
        self.start = start
        # The random order: one private generator, seeded once, drawn one permutation per block-epoch.
        self._generator = torch.Generator().manual_seed(config.seed)
        self._epochs: list[list[int]] = []

    def epoch_order(self, epoch: int) -> list[int]:
        """The order in which block-epoch `epoch` visits the blocks."""
        D = self.num_blocks
        if self.mode == "ascending":
            return [(self.start + i) % D for i in range(D)]
        if self.mode == "descending":
            return [(self.start - i) % D for i in range(D)]
        if self.mode == "fixed":
            return [self.start] * D
        while len(self._epochs) <= epoch:
            perm = torch.randperm(D, generator=self._generator).tolist()
            if not self._epochs and self.config.start_block is not None:
                perm.remove(self.start)
                perm.insert(0, self.start)
            self._epochs.append(perm)
        return self._epochs[epoch]

    def position(self, step: int) -> tuple[int, int, int]:
        """(block-epoch, visit within the epoch, steps already done in the current block) after `step` steps."""
        visit, in_block = divmod(step, self.switch_every)
        epoch, within = divmod(visit, self.num_blocks)
        return epoch, within, in_block

    def block_at(self, step: int) -> int:
        """Index of the block that takes optimizer step number `step + 1`."""
        epoch, within, _ = self.position(step)
        return self.epoch_order(epoch)[within]
