"""What the demos share: a run in a process of its own, memory and optimizer-state measurements, a Trainer
callback that records them per step, and the loss-curve plot with BAdam's block switches marked."""

from __future__ import annotations

import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..core.optimizer import unwrap_optimizer
from ..integrations.cpu_compute import fp32_linear_compute


class IsolatedRunFailed(RuntimeError):
    """The process of `run_isolated` died (killed for memory, say) or `fn` raised there; `exitcode` says which."""

    def __init__(self, message: str, exitcode: int | None):
        super().__init__(message)
        self.exitcode = exitcode


def _child(conn, fn, args) -> None:
    try:
        conn.send((True, fn(*args)))
    except BaseException:  # report it to the parent, whatever it was
        import traceback

        conn.send((False, traceback.format_exc()))
        raise SystemExit(1)
    finally:
        conn.close()


def run_isolated(fn: Callable, *args, isolate: bool = True):
    """`fn(*args)` in a fresh (spawned) process, so its peak memory is its own; `isolate=False`: right here.
    A process that dies (an out-of-memory kill) or an exception in it raises IsolatedRunFailed here, so a
    caller can report that run and go on with the next."""
    if not isolate:
        return fn(*args)
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args))
    proc.start()
    send.close()
    try:
        ok, value = receive.recv()
    except EOFError:  # died without a word
        ok, value = False, None
    proc.join()
    if not ok:
        raise IsolatedRunFailed(f"{getattr(fn, '__name__', fn)} failed in its process (exit code {proc.exitcode})"
                                + (f":\n{value}" if value else ""), proc.exitcode)
    return value


def peak_rss_kb() -> int:
    """The process's peak resident memory since it started (KiB)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_bytes() -> int:
    """Resident memory now (Linux; 0 elsewhere)."""
    try:
        return _status_kb("VmRSS") * 1024
    except (OSError, KeyError):
        return 0


def reset_peak_rss() -> bool:
    """Reset the peak (VmHWM) to the current RSS (Linux: write 5 to clear_refs). False when not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident memory since the last `reset_peak_rss()` (or since start where it cannot be reset)."""
    try:
        return _status_kb("VmHWM") * 1024
    except (OSError, KeyError):
        return peak_rss_kb() * 1024


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state: a BlockOptimizer's moments + fp32 masters (active block), else the moments."""
    block = unwrap_optimizer(optimizer)
    if block is not None:
        mem = block.memory_bytes()
        return mem["optimizer_state"] + mem["masters"]
    inner = optimizer
    for _ in range(5):  # accelerate's wrapper holds it as .optimizer, the authors' BlockOptimizer as .base_optimizer
        wrapped = getattr(inner, "base_optimizer", None) or getattr(inner, "optimizer", None)
        if wrapped is None or wrapped is inner:
            break
        inner = wrapped
    return sum(v.numel() * v.element_size() for st in inner.state.values() for v in st.values() if hasattr(v, "numel"))


def watch_state_peak(optimizer, on_bytes) -> None:
    """Report a BlockOptimizer's state right after each inner Adam step: with K=1 (or at a switch) the block's
    masters and moments are dropped inside `step()`, so the Trainer's `on_step_end` would never see them."""
    block = unwrap_optimizer(optimizer)
    if block is not None:
        block.inner.register_step_post_hook(lambda *_: on_bytes(optimizer_state_bytes(block)))


def step_recorder():
    """A TrainerCallback that records, per optimizer step, the seconds since training began (evaluation time
    left out), the largest optimizer state seen (BAdam drops a block's state when it switches), and the peak
    resident memory of training (`peak_rss`; the model is loaded before; evaluations are left out: the peak
    is read before each and reset after it)."""
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.peak_state_bytes = 0
            self.peak_rss = 0
            self._start = None
            self._paused = 0.0

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is not None:
                watch_state_peak(optimizer, self._note_state)
            reset_peak_rss()
            self._start = time.perf_counter()

        def _note_state(self, nbytes: int) -> None:
            self.peak_state_bytes = max(self.peak_state_bytes, nbytes)

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            self.seconds.append(time.perf_counter() - self._start - self._paused)
            self.peak_rss = max(self.peak_rss, peak_rss_bytes())
            if optimizer is not None:
                self._note_state(optimizer_state_bytes(optimizer))

        def exclude(self, seconds: float) -> None:
            """Leave `seconds` (an evaluation between two steps) out of the training time, and its memory out of
            the training peak."""
            self._paused += seconds
            reset_peak_rss()

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


STYLES = {"badam": ("BAdam", "-"), "adamw": ("AdamW", "--"), "lora": ("LoRA (q, v)", "-."),
          "lora_all": ("LoRA (all linear)", (0, (5, 1, 1, 1))), "reference": ("authors' badam", ":")}


def held_out_points(result: dict, axis: str) -> tuple[list, list]:
    """(xs, ys) of a run's held-out loss from before training on: x is the step (axis="step") or the training
    seconds (axis="seconds") of each evaluation in `result["held_out_curve"]`."""
    k = {"step": 0, "seconds": 1}[axis]
    curve = result["held_out_curve"]
    return [0] + [c[k] for c in curve], [result["held_out_loss_before"]] + [c[2] for c in curve]


def switch_positions(steps: int, switch_every: int) -> list[float]:
    """Where BAdam's block switches fall on a step axis (between the steps)."""
    return [k * switch_every + 0.5 for k in range(1, (steps - 1) // switch_every + 1)]


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
            ax.plot(xs, ys, linestyle=style, marker="o" if len(xs) <= 20 else None, markersize=3, label=label)
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


# --- one method's fine-tuning run (the demo and benchmarks/convergence.py) ---------------------------------

# LoRA as in the paper (rank 8 on q and v) and on every linear layer of a Llama block.
LORA_TARGETS = {
    "lora": ["q_proj", "v_proj"],
    "lora_all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
# BAdam's family: what each variant adds to the recipe's `badam` section (BAdamConfig's flat keys).
BADAM_VARIANTS = {
    "badam": {},
    "badam_ratio": {"mode": "ratio", "update_ratio": 0.05, "mask_mode": "adjacent"},
    "lisa": {"mode": "lisa", "lisa_layers": 2},
    "badam_bread": {"inactive_update": "sgd", "inactive_scope": "above"},
    "badam_bread_sign": {"inactive_update": "signsgd", "inactive_scope": "above"},
}
FINETUNE_METHODS = (*BADAM_VARIANTS, "adamw", "lora", "lora_all", "reference")


def evaluate(model, tokenizer, records: list[dict], cutoff_len: int, max_new_tokens: int = 0, batch: int = 16,
             loss_batch: int = 4):
    """(exact match or None, held-out loss, generations) on Alpaca-style `records` with the chat template: the
    loss over all answer tokens, and, when `max_new_tokens` > 0, the exact match of the greedy answer."""
    import torch

    from ..data.sft import SFTCollator, format_chat, tokenize_sft

    was_training = model.training
    model.eval()
    features = tokenize_sft(records, tokenizer, cutoff_len, template="chat")
    collate = SFTCollator(tokenizer.pad_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(records), loss_batch):
            b = collate([{k: v[j] for k, v in features.items()} for j in range(i, min(i + loss_batch, len(records)))])
            logits = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).logits.float()
            labels = b["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
        exact, generations = None, []
        if max_new_tokens > 0:
            side = tokenizer.padding_side
            tokenizer.padding_side = "left"  # generation continues each prompt from its end
            for i in range(0, len(records), batch):
                part = records[i:i + batch]
                enc = tokenizer([format_chat(r, tokenizer)[0] for r in part], return_tensors="pt", padding=True,
                                add_special_tokens=False)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
                generations += [tokenizer.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
                                for o in out]
            tokenizer.padding_side = side
            exact = sum(g == r["output"] for g, r in zip(generations, records)) / len(records)
    if was_training:
        model.train()
    return exact, total / max(count, 1), generations


def held_out_records(job: dict) -> list[dict]:
    import json

    return json.loads(Path(job["held_out_file"]).read_text())


def evaluate_before(job: dict) -> dict:
    """The untrained model on the held-out records (in a process of its own): exact match, loss, generations."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(job["threads"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    with fp32_linear_compute():
        exact, loss, gens = evaluate(model, tokenizer, held_out_records(job), job["cutoff_len"], job["max_new_tokens"])
    return {"eval_before": exact, "held_out_loss_before": loss, "generations_before": gens[: job["shown"]]}


def finetune_recipe(method: str, *, model_dir: str, train_file: str, out_dir: str, steps: int, batch_size: int,
                    lr: float, cutoff_len: int, switch_every: int, switch_mode: str, seed: int) -> dict:
    """The recipe (as a dict) one method's run trains through: the same model, data and batches for every method.
    AdamW as HF users run mixed precision (fp32 weights, bf16 autocast); BAdam and LoRA keep bf16 weights
    (BAdam's fp32 masters exist for the active block only). Constant learning rate, clipping at 1.0."""
    return {
        "model": {"name_or_path": model_dir, "dtype": "float32" if method == "adamw" else "bfloat16"},
        "data": {"dataset": train_file, "format": "alpaca", "template": "chat", "cutoff_len": cutoff_len, "seed": seed},
        "badam": {"switch_every": switch_every, "switch_mode": switch_mode, "seed": seed, **BADAM_VARIANTS.get(method, {})},
        "training": {
            "output_dir": str(Path(out_dir) / f".run_{method}"), "max_steps": steps,
            "per_device_train_batch_size": batch_size, "learning_rate": lr, "lr_scheduler_type": "constant",
            "max_grad_norm": 1.0, "weight_decay": 0.0, "bf16": method == "adamw", "logging_steps": 1,
            "save_strategy": "no", "eval_strategy": "no", "use_cpu": True, "report_to": "none", "seed": seed,
            "data_seed": seed, "dataloader_num_workers": 0, "disable_tqdm": False, "log_level": "error",
        },
    }


def check_positive(settings, names) -> None:
    """Refuse a settings dataclass whose named fields are not >= 1, naming the field and the value."""
    from ..core.errors import BAdamConfigError

    for name in names:
        if getattr(settings, name) < 1:
            raise BAdamConfigError(f"{name}={getattr(settings, name)!r}: it must be >= 1.")


def _reference_optimizer(model, args, recipe):
    """The authors' `badam` package (1.4): its BlockOptimizer over AdamW, one block per decoder layer."""
    import torch
    from badam import BlockOptimizer as ReferenceBlockOptimizer

    from ..core.partition import partition_model

    blocks = partition_model(model, recipe.badam.partition).blocks
    base = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    mode = recipe.badam.schedule.switch_mode
    return ReferenceBlockOptimizer(base, list(model.named_parameters()), block_prefix_list=[[f"{b.name}."] for b in blocks],
                                   switch_block_every=recipe.badam.schedule.switch_every,
                                   switch_mode=mode, verbose=0)


def train_method(method: str, job: dict) -> dict:
    """Train `method` on `job["recipe"]` (a recipe dict: the same model, data and batches for every method) through
    the recipe code path, with a progress bar; the held-out loss every `eval_every` steps (training seconds leave
    it out) and, at the end, the held-out evaluation. Runs in the caller's process: use `run_isolated`."""
    import torch
    from transformers import Trainer, TrainerCallback

    from ..integrations.trainer import BAdamTrainer
    from ..recipes import build_parts, validate

    if method not in FINETUNE_METHODS:
        raise ValueError(f"method={method!r}: choose from {', '.join(FINETUNE_METHODS)}.")
    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    recipe = validate(job["recipe"], where=f"<{method}>")
    parts = build_parts(recipe)
    model, tokenizer, args = parts.model, parts.tokenizer, parts.args
    held = held_out_records(job)
    n_params = sum(p.numel() for p in model.parameters())
    if method in LORA_TARGETS:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS[method], task_type="CAUSAL_LM"))
        parts.model = model
    recorder = step_recorder()
    curve: list[tuple[int, float, float]] = []
    steps = args.max_steps

    class HeldOutLoss(TrainerCallback):
        # the last step's held-out loss comes from the final evaluation below (computed once, not twice)
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % job["eval_every"] == 0 and state.global_step < steps:
                start = time.perf_counter()
                _, loss, _ = evaluate(model, tokenizer, held, job["cutoff_len"])
                recorder.exclude(time.perf_counter() - start)
                curve.append((state.global_step, recorder.seconds[-1], loss))

    kwargs = parts.trainer_kwargs() | {"eval_dataset": None, "callbacks": [recorder, HeldOutLoss()]}
    if method in BADAM_VARIANTS:
        trainer = BAdamTrainer(badam_config=recipe.badam, **kwargs)
    elif method == "reference":
        trainer = Trainer(optimizers=(_reference_optimizer(model, args, recipe), None), **kwargs)
    else:
        trainer = Trainer(**kwargs)
    use_quiet_progress_bar(trainer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with fp32_linear_compute():  # CPU bf16 products in fp32 where the CPU lacks bf16 arithmetic
        trainer.train()
        exact, loss, generations = evaluate(model, tokenizer, held, job["cutoff_len"], job["max_new_tokens"])
    curve.append((trainer.state.global_step, recorder.seconds[-1], loss))
    logged = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    result: dict[str, Any] = {
        "lr": args.learning_rate,
        "eval_after": exact,
        "held_out_loss_after": loss,
        "generations_after": generations[: job["shown"]],
        "train_seconds": recorder.seconds[-1],
        "seconds_per_step": recorder.seconds[-1] / len(recorder.seconds),
        "peak_rss_gb": recorder.peak_rss / 1e9,  # training (model included, evaluations left out)
        "optimizer_state_bytes": recorder.peak_state_bytes,
        "num_parameters": n_params,
        "trainable_parameters": trainable,
        "train_losses": [h["loss"] for h in logged],
        "step_seconds": recorder.seconds,
        "held_out_curve": curve,
    }
    opt = unwrap_optimizer(trainer.optimizer)
    if opt is not None:
        result.update(_block_family_counts(opt, logged))
    return result


def _block_family_counts(opt, logged: list[dict]) -> dict[str, Any]:
    """What a BAdam-family run trained: the blocks it visited and the parameters trained at one time (layer: the
    largest block; lisa: the largest `lisa_layers` blocks and the always-active ones; ratio: `update_ratio` of
    every block parameter and the always-active ones)."""
    from ..core.selection import selection_size

    params, cfg = opt.params_by_name, opt.config
    sizes = {b.name: sum(params[n].numel() for n in b.param_names) for b in opt.partition.blocks}
    always = sum(params[n].numel() for n in opt.partition.always_active)
    if opt.mode == "ratio":
        visited = set(sizes)  # every block trains a part of its entries in every period
        trainable = sum(selection_size(params[n].numel(), cfg.ratio.update_ratio)
                        for b in opt.partition.blocks for n in b.param_names)
    else:
        visited = {name for h in logged for name in str(h.get("badam/active_block_name", "")).split("+") if name}
        at_once = cfg.lisa.lisa_layers if opt.mode == "lisa" else 1
        trainable = sum(sorted(sizes.values(), reverse=True)[:at_once])
    return {"active_blocks": [h.get("badam/active_block") for h in logged],
            "active_block_names": [h.get("badam/active_block_name") for h in logged], "num_blocks": opt.num_blocks,
            "blocks_visited": len(visited), "trainable_parameters": trainable + always}
