"""The block schedule: which block is active after `t` optimizer steps.

It is a pure function of `t`, so a resumed run, a callback and the optimizer always agree on the active
block without replaying history. Every block gets exactly `switch_every` steps, the first one included.
With `sample_size` (mode `lisa`) each period of `switch_every` steps trains that many blocks, drawn without
replacement from a generator seeded with (seed, period) alone: also a pure function of `t`. In mode
`ratio` every block trains in every step, and only the periods matter (the masks move between them).
"""

from __future__ import annotations

import torch

from .config import DEFAULT_SWITCH_EVERY, ScheduleConfig
from .errors import BAdamConfigError


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def period_seed(seed: int, period: int, salt: int = 0) -> int:
    """A generator seed for (seed, period, salt), hashed (splitmix64) so that neighbouring inputs give
    unrelated streams; nothing depends on what was drawn before, so a resumed run draws the same."""
    h = _splitmix64(seed & 0xFFFFFFFFFFFFFFFF)
    h = _splitmix64(h ^ (period & 0xFFFFFFFFFFFFFFFF))
    h = _splitmix64(h ^ (salt & 0xFFFFFFFFFFFFFFFF))
    return h >> 1  # torch takes seeds below 2**63 here


class BlockSchedule:
    def __init__(self, num_blocks: int, config: ScheduleConfig, sample_size: int | None = None,
                 every_block: bool = False):
        if num_blocks < 1:
            raise BAdamConfigError("the partition has no blocks.")
        if sample_size is not None and not 1 <= sample_size <= num_blocks:
            raise BAdamConfigError(
                f"lisa_layers={sample_size} is out of range; the model has {num_blocks} layers to sample from "
                f"(choose 1..{num_blocks})."
            )
        self.sample_size = sample_size
        self.every_block = every_block
        self.periodic = every_block or sample_size is not None  # what changes at a switch is a period's draw
        start = config.start_block
        if start is not None and start >= num_blocks:
            raise BAdamConfigError(
                f"start_block={start} is out of range; the model has {num_blocks} blocks (0..{num_blocks - 1})."
            )
        self.num_blocks = num_blocks
        self.config = config
        self.switch_every = config.switch_every if config.switch_every is not None else DEFAULT_SWITCH_EVERY["layer"]
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
        """Index of the block that takes optimizer step number `step + 1` (with `sample_size`: the lowest of the
        sampled blocks)."""
        if self.periodic:
            return self.active_at(step)[0]
        epoch, within, _ = self.position(step)
        return self.epoch_order(epoch)[within]

    def period(self, step: int) -> int:
        return step // self.switch_every

    def sample(self, period: int) -> tuple[int, ...]:
        """The blocks of LISA period `period`, ascending."""
        gen = torch.Generator().manual_seed(period_seed(self.config.seed, period))
        return tuple(sorted(torch.randperm(self.num_blocks, generator=gen)[: self.sample_size].tolist()))

    def active_at(self, step: int) -> tuple[int, ...]:
        """The blocks that take optimizer step number `step + 1`."""
        if self.every_block:
            return tuple(range(self.num_blocks))
        if self.sample_size is not None:
            return self.sample(self.period(step))
        return (self.block_at(step),)

    def switches_at(self, step: int) -> bool:
        """Whether step `step + 1` starts a new visit: every `switch_every` steps, whichever blocks it trains. A
        visit that draws the block just trained (random order across a block-epoch boundary, `fixed`, a single
        block, a period of mode lisa or ratio that draws the same layers) restarts it all the same: the block's
        last step writes its masters back with `switch_rounding`, and the next visit starts with fresh masters
        and moments. Every visit is exactly K steps."""
        return step % self.switch_every == 0
