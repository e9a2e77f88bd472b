"""What the demos share: a run in a process of its own, memory and optimizer-state measurements, a Trainer
callback that records them per step, and the loss-curve plot with BAdam's block switches marked."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..core.optimizer import unwrap_optimizer


def run_isolated(fn: Callable, *args, isolate: bool = True):
    """`fn(*args)` in a fresh (spawned) process, so its peak memory is its own; `isolate=False`: right here."""
    if not isolate:
        return fn(*args)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def peak_rss_kb() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


def rss_now_kb() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except OSError:  # not Linux
        return 0


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state: a BlockOptimizer's moments + fp32 masters (active block), else the moments."""
    block = unwrap_optimizer(optimizer)
    if block is not None:
        mem = block.memory_bytes()
        return mem["optimizer_state"] + mem["masters"]
    inner = optimizer
    while hasattr(inner, "optimizer") and not hasattr(inner, "state"):
        inner = inner.optimizer
    inner = getattr(inner, "optimizer", inner)
    return sum(v.numel() * v.element_size() for st in inner.state.values() for v in st.values() if hasattr(v, "numel"))


def step_recorder():
    """A TrainerCallback that records, per optimizer step, the seconds since training began (evaluation time
    left out) and the largest optimizer state seen (BAdam drops a block's state when it switches)."""
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.peak_state_bytes = 0
            self._start = None
            self._paused = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            self.seconds.append(time.perf_counter() - self._start - self._paused)
            if optimizer is not None:
                self.peak_state_bytes = max(self.peak_state_bytes, optimizer_state_bytes(optimizer))

        def exclude(self, seconds: float) -> None:
            """Leave `seconds` (an evaluation between two steps) out of the training time."""
            self._paused += seconds

        def on_evaluate(self, args, state, control, **kwargs):
            # the Trainer's own evaluation ran between two steps: it is not training time
            if self.seconds:
                self._paused = time.perf_counter() - self._start - self.seconds[-1]

    return StepRecorder()


def use_quiet_progress_bar(trainer) -> None:
    """The Trainer's progress bar without its one printed dict per logged step."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class QuietProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())


STYLES = {"badam": ("BAdam", "-"), "adamw": ("AdamW", "--"), "lora": ("LoRA", "-."), "reference": ("authors' badam", ":")}


def plot_curves(path: Path, panels: list[dict[str, Any]], switches: list[float] = (), title: str = "") -> None:
    """Side-by-side panels of curves. Each panel: {"x": label, "y": label, "curves": {method: (xs, ys)},
    "switches": bool}; BAdam's block switches (x positions) are drawn as dotted lines where asked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for method, (xs, ys) in panel["curves"].items():
            label, style = STYLES.get(method, (method, "-"))
            ax.plot(xs, ys, style, marker="o" if len(xs) <= 20 else None, markersize=3, label=label)
        if panel.get("switches"):
            for k, s in enumerate(switches):
                ax.axvline(s, color="gray", linestyle=":", linewidth=0.7, label="BAdam block switch" if k == 0 else None)
        ax.set_xlabel(panel["x"])
        ax.set_ylabel(panel["y"])
        if panel.get("log"):
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
