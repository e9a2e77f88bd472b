"""Count live tensor bytes, phase by phase, independent of any allocator.

RSS says what the process holds (allocator caches and fragmentation included); this says which tensors
hold it (also for meta tensors: storages are told apart by identity, not address; `tools/dry_run.py` builds
its exact GPU-memory simulation on the same idea). `LiveTensorBytes` is a `TorchDispatchMode`: every tensor an aten op returns is recorded by its
storage (views of a known storage are not counted twice) together with the phase it was made in and the
op that made it; storages are dropped from the count once they are freed. Tensors that existed before the
mode was entered (the model's weights) are registered with `track()`.

    live = LiveTensorBytes()
    live.track(model.parameters(), "weights")
    with live:
        with live.phase("forward"):
            loss = model(**batch).loss
        with live.phase("backward"):
            loss.backward()
    live.peaks          # {"forward": bytes, "backward": bytes}: the most alive at any moment of each phase
    live.peak_snapshot  # what was alive at the overall peak, grouped by (phase made in, op or label)

`labeler` (a callable returning {storage_key(tensor): name}) names known tensors (masters, moments, grads) in
the peak snapshot; everything else is named by the op that produced it.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable, Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Snapshot the live set at a new peak only when it is this much above the last snapshot (keeps it cheap):
# 1 MiB, or 2% of what is alive when that is less (small models).
SNAPSHOT_STEP_BYTES = 1 << 20


def storage_key(t: torch.Tensor) -> int:
    """The identity of `t`'s storage (its StorageImpl): unlike `data_ptr()`, which is 0 for every meta storage,
    it tells meta storages apart. A counted storage is held through a `StorageWeakRef`, so its address is not
    reused before the count drops it."""
    return t.untyped_storage()._cdata


class LiveTensorBytes(TorchDispatchMode):
    def __init__(self, labeler: Callable[[], dict[int, str]] | None = None):
        super().__init__()
        self.labeler = labeler
        # key -> (weak ref to the storage, bytes, phase made in, op or label)
        self._live: dict[int, tuple[StorageWeakRef, int, str, str]] = {}
        self.current = 0
        self.peak = 0
        self.peaks: dict[str, int] = {}
        self.peak_phase: str | None = None
        self.peak_snapshot: dict[tuple[str, str], int] = {}
        self._snapshot_at = -1
        self._phase = "setup"

    # --- what is alive -------------------------------------------------------------------------------

    def track(self, tensors: Iterable[torch.Tensor], label: str) -> None:
        """Count tensors made before the mode was entered (the model's weights, say) under `label`."""
        for t in tensors:
            self._add(t, label)
        self._note_peak()

    def _add(self, t: torch.Tensor, op: str) -> None:
        if not hasattr(t, "untyped_storage"):
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage of their own
            return
        key = storage._cdata
        held = self._live.get(key)
        if held is not None:
            if not held[0].expired():
                return  # a view of a storage already counted
            self.current -= held[1]
        nbytes = storage.nbytes()
        self._live[key] = (StorageWeakRef(storage), nbytes, self._phase, op)
        self.current += nbytes

    def _sweep(self) -> None:
        dead = [k for k, v in self._live.items() if v[0].expired()]
        for k in dead:
            self.current -= self._live.pop(k)[1]

    def _note_peak(self) -> None:
        self.peaks[self._phase] = max(self.peaks.get(self._phase, 0), self.current)
        if self.current > self.peak:
            self.peak = self.current
            self.peak_phase = self._phase
            if self.current >= self._snapshot_at + min(SNAPSHOT_STEP_BYTES, self.current // 50):
                self._snapshot()

    def _snapshot(self) -> None:
        labels = self.labeler() if self.labeler is not None else {}
        snap: dict[tuple[str, str], int] = defaultdict(int)
        for key, (_, nbytes, phase, op) in self._live.items():
            snap[(phase, labels.get(key, op))] += nbytes
        self.peak_snapshot = dict(snap)
        self._snapshot_at = self.current

    # --- phases --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def phase(self, name: str):
        previous, self._phase = self._phase, name
        self._sweep()
        self._note_peak()
        try:
            yield self
        finally:
            self._sweep()
            self._note_peak()
            self._phase = previous

    def set_phase(self, name: str) -> None:
        """Switch phase without a context (for hooks that mark where an optimizer step is)."""
        self._sweep()
        self._note_peak()
        self._phase = name
        self._note_peak()

    def live_bytes(self) -> int:
        self._sweep()
        return self.current

    # --- the mode ------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        new = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if new:
            self._sweep()  # frees since the last op: the peak is what is alive together with the new outputs
            name = getattr(func, "__name__", str(func))
            for t in new:
                self._add(t, name)
            self._note_peak()
        return out


def format_snapshot(snapshot: dict[tuple[str, str], int], top: int = 12) -> list[tuple[str, str, int]]:
    """The biggest (phase, what, bytes) entries of a peak snapshot, largest first."""
    rows = sorted(((p, w, b) for (p, w), b in snapshot.items()), key=lambda r: -r[2])
    return rows[:top]
