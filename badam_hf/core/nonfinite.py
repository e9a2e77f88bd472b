"""Steps with inf/NaN gradients (`skip_nonfinite`): finding them, agreeing on them across ranks, and counting
them, with a clear stop when too many come in a row. `BlockOptimizer.step` skips such a step: weights,
masters and moments stay as they were, and the step still counts towards `switch_every`.
"""

from __future__ import annotations

import logging

import torch

from .errors import NonFiniteGradientError
from .shards import local_shard

logger = logging.getLogger("badam_hf")


class NonFiniteSteps:
    """`grads_finite` and `note_step`, as a base class of `BlockOptimizer` (its counters `skipped_steps` and
    `_skips_in_a_row` start in `_init_counters`)."""

    @torch.no_grad()
    def grads_finite(self) -> bool:
        """Whether every gradient the step is about to use (the inner optimizer's, BREAD's, and those BREAD's
        in-backward step checked already) is finite, on every rank. Costs one host sync per step: one fused
        reduction (each tensor's 2-norm) and, under an engine, one all-reduce of the verdict. A 2-norm also
        overflows for a finite gradient past about 1e19, so where one is not finite the exact check (each
        tensor's largest |g|: nothing overflows; on the CPU about 10x slower) decides."""
        grads = [t.grad for g in self.inner.param_groups for t in g["params"] if t.grad is not None]
        grads += self._inactive.grads()  # BREAD's step comes after this check: a NaN there skips it too
        fast = self._any_nonfinite(grads, 2)
        if fast is None:  # a dry run (badam-hf estimate --exact) has no values: it never skips
            return True
        return not (fast and self._any_nonfinite(grads, float("inf")))

    def _any_nonfinite(self, grads: list[torch.Tensor], ord: float) -> bool | None:
        """Whether a norm of order `ord` of any of `grads` is not finite on any rank (None on the meta device)."""
        if grads:
            norms = torch._foreach_norm(grads, ord)
            ends = torch.stack([n.to(norms[0].device) for n in norms])
            bad = (ends - ends).ne(0).any().float()  # x - x is 0 exactly for a finite x (NaN for inf and NaN)
        else:
            bad = torch.zeros((), device=local_shard(next(iter(self._params.values()))).device)
        for ok in self._inactive.finite_flags():  # inactive_timing=backward: a NaN seen (and dropped) there
            bad = torch.maximum(bad, (~ok).to(device=bad.device, dtype=bad.dtype))
        self._reduce_flag(bad)
        return None if bad.device.type == "meta" else bool(bad)

    def note_step(self, skipped: bool) -> None:
        """Count a step taken or skipped for inf/NaN gradients; too many skips in a row stop training."""
        if not skipped:
            self._skips_in_a_row = 0
            return
        self.skipped_steps += 1
        self._skips_in_a_row += 1
        where = f"step {self.global_step + 1}, block {self.active_block_name!r}"
        if self._skips_in_a_row >= self.config.max_skipped_steps:
            raise NonFiniteGradientError(
                f"{self._skips_in_a_row} optimizer steps in a row had inf/NaN gradients (the last at {where}); "
                f"stopping (max_skipped_steps={self.config.max_skipped_steps}). The weights hold the values from before "
                "the first skipped step. Try a lower learning rate or a longer warmup, gradient clipping "
                "(max_grad_norm), bf16 instead of fp16, or look for broken examples in the data; then resume from "
                "the last checkpoint."
            )
        logger.warning(
            "BAdam skipped optimizer step (%s): inf/NaN gradient; weights, masters and moments unchanged. The step "
            "still counts towards switch_every. %d skipped so far, %d in a row (training stops at %d).",
            where, self.skipped_steps, self._skips_in_a_row, self.config.max_skipped_steps,
        )
