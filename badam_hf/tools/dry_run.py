"""GPU memory of a training step, computed exactly without a GPU: the real step on `meta` tensors.

The real Hugging Face forward and backward (non-reentrant gradient checkpointing) and the real
optimizer step (`BlockOptimizer.step()`, torch's fused AdamW, peft's LoRA) run on tensors of the `meta`
device, which have shapes and dtypes but no memory. `StorageCounter` (a `TorchDispatchMode`) sees every
tensor an op makes and counts the bytes of each storage until it is freed, keyed on the storage's identity
(its `StorageImpl`, held through a `StorageWeakRef`): `data_ptr()` is 0 for every meta storage, so it
cannot tell two of them apart. The result is what a CUDA device would hold in tensors at each moment:
`torch.cuda.max_memory_allocated` minus the caching allocator's rounding (every block is a multiple of
512 bytes) and minus what CUDA kernels allocate internally (cuBLAS workspaces, flash attention's
backward accumulators), which no tensor op returns.

Three things stop the real step on meta; `meta_workarounds()` changes them for the dry run only and puts
everything back afterwards:
- transformers' `masking_utils.find_packed_sequence_indices` calls `.all()` (a `.item()`) on the position
  ids. For rows that are not packed (what the dry run feeds) the real run gets `None` there.
- torch's fused Adam/AdamW refuses devices outside `_get_fused_kernels_supported_devices()`, which lacks
  meta although `_fused_adamw_` has a meta kernel. The per-tensor fallback would add temporaries the real
  CUDA run does not make.
- SDPA on meta always takes the math path (fp32 upcast, the whole score matrix). A CUDA run takes flash
  attention, which keeps the output and one fp32 log-sum-exp per row and query head. The dry run calls
  torch's flash attention op that has meta kernels for forward and backward and returns exactly those
  tensors (`_scaled_dot_product_flash_attention_for_cpu`; the CUDA op adds two 8-byte RNG tensors).

    from badam_hf.tools.dry_run import Setting, dry_run
    result = dry_run(Setting.from_model("llama3-8b", batch=2, seq=728), methods=("badam",))
    result["methods"]["badam"]["steps"][1]["peak_bytes"]
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GB = 1e9
CUDA_BLOCK_BYTES = 512  # the CUDA caching allocator rounds every allocation up to a multiple of this
METHODS = ("badam", "adamw", "lora")

# What a storage made in a phase is, when no optimizer or model structure names it.
PHASE_KINDS = {
    "setup": "other",
    "inputs": "inputs",
    "forward": "activations",
    "forward: loss": "loss temporaries",
    "backward: loss": "loss temporaries",
    "backward": "backward temporaries",
    "checkpoint save": "checkpoint temporaries",
}


def storage_key(t: torch.Tensor) -> int | None:
    """The identity of `t`'s storage (its StorageImpl address); None for tensors without one."""
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


class StorageCounter(TorchDispatchMode):
    """Live tensor bytes by storage identity, on any device (meta included), and what is alive at the peak.

    Every tensor an aten op returns is recorded by its storage (views of a counted storage add nothing) and
    dropped once the storage is freed. Tensors made before the mode was entered are registered with `track`.
    `labeler()` returns {storage key: kind} for the tensors the caller can name (weights, moments, ...); it
    runs at every phase switch and at the peak, and a storage keeps the kind it was first given. Others are
    named by the phase they were made in (`PHASE_KINDS`, else "optimizer temporaries").

    The peak is exact: the live set is written down lazily, just before the first free after a new peak,
    which is the moment the peak's set stops being the live set.
    """

    def __init__(self, labeler: Callable[[], dict[int, str]] | None = None):
        super().__init__()
        self.labeler = labeler
        # key -> [weak ref, bytes, phase made in, kind or None]
        self._live: dict[int, list] = {}
        # Storages that live through the run (the weights): counted, but only checked at phase switches.
        self._pinned: dict[int, list] = {}
        self.current = 0
        self.current_rounded = 0
        self.phase = "setup"
        self._pending_snapshot = False
        self.reset_peak()

    # --- counting ------------------------------------------------------------------------------------

    def reset_peak(self) -> None:
        self._sweep()
        self.peak = self.current
        self.peak_rounded = self.current_rounded
        self.peak_phase = self.phase
        self.phase_peaks: dict[str, int] = {}
        self._pending_snapshot = True
        self._peak_entries: list[list] = []

    def track(self, tensors: Iterable[torch.Tensor], pinned: bool = False) -> None:
        """Count tensors made before the mode was entered. `pinned`: they live through the run (the weights),
        so they are checked for frees at phase switches only (a sweep per op over them costs time at 8B)."""
        for t in tensors:
            self._add(t)
            key = storage_key(t)
            if pinned and key in self._live:
                self._pinned[key] = self._live.pop(key)
        self._note_peak()

    def _add(self, t: torch.Tensor) -> None:
        key = storage_key(t)
        if key is None:
            return
        held = self._live.get(key) or self._pinned.get(key)
        if held is not None and not held[0].expired():
            return  # a view of a storage already counted
        if held is not None:  # freed, and its address reused before a sweep saw it
            self._forget(key)
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        self._live[key] = [StorageWeakRef(storage), nbytes, self.phase, None]
        self.current += nbytes
        self.current_rounded += -(-nbytes // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES

    def _forget(self, key: int) -> None:
        nbytes = (self._live.pop(key) if key in self._live else self._pinned.pop(key))[1]
        self.current -= nbytes
        self.current_rounded -= -(-nbytes // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES

    def _sweep(self) -> None:
        dead = [k for k, v in self._live.items() if v[0].expired()]
        if dead:
            if self._pending_snapshot:
                self._snapshot()  # the peak's live set, before its first free
            for k in dead:
                self._forget(k)

    def _note_peak(self) -> None:
        if self.current > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = self.current
        self.peak_rounded = max(self.peak_rounded, self.current_rounded)
        if self.current > self.peak:
            self.peak = self.current
            self.peak_phase = self.phase
            self._pending_snapshot = True

    def _label(self) -> None:
        if self.labeler is None:
            return
        names = self.labeler()
        for key, entry in (*self._live.items(), *self._pinned.items()):
            if entry[3] is None and key in names and not entry[0].expired():
                entry[3] = names[key]

    def kind_of(self, entry) -> str:
        if entry[3] is not None:
            return entry[3]
        return PHASE_KINDS.get(entry[2], "optimizer temporaries" if entry[2].startswith("step") else "other")

    def _snapshot(self) -> None:
        # The entries themselves: one named later (at the next phase switch, while it is still alive) is
        # named in the peak's set too, e.g. a buffer made inside a hook before its owner holds it.
        self._label()
        self._peak_entries = [*self._live.values(), *self._pinned.values()]
        self._pending_snapshot = False

    @property
    def peak_alive(self) -> dict[str, int]:
        """What was alive at the peak, in bytes by kind."""
        alive: dict[str, int] = {}
        for entry in self._peak_entries:
            kind = self.kind_of(entry)
            alive[kind] = alive.get(kind, 0) + entry[1]
        return alive

    def finish(self) -> None:
        """Write down the peak's live set if nothing was freed since the peak."""
        if self._pending_snapshot:
            self._snapshot()

    def set_phase(self, name: str) -> None:
        dead = [k for k, v in self._pinned.items() if v[0].expired()]
        if dead and self._pending_snapshot:
            self._snapshot()
        for k in dead:
            self._forget(k)
        self._sweep()
        self._note_peak()
        self._label()
        self.phase = name

    def live_bytes(self) -> int:
        self._sweep()
        return self.current

    def alive_by_kind(self) -> dict[str, int]:
        self._sweep()
        self._label()
        out: dict[str, int] = {}
        for entry in (*self._live.values(), *self._pinned.values()):
            kind = self.kind_of(entry)
            out[kind] = out.get(kind, 0) + entry[1]
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        new = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if new:
            self._sweep()  # frees since the last op: the peak is what is alive together with the new outputs
            for t in new:
                self._add(t)
            self._note_peak()
        return out


# --- the workarounds, for the dry run only ----------------------------------------------------------------


def _flash_sdpa(original):
    """F.scaled_dot_product_attention that takes the flash path for meta tensors, as a CUDA run does."""

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type != "meta":
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        # The op takes grouped key/value heads as they are (enable_gqa) and has meta kernels both ways.
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    sdpa.__wrapped__ = original
    return sdpa


def _no_packed_sequences(position_ids):
    # The dry run feeds rows that are not packed: the real function returns None for them.
    return None


def _with_meta(original):
    def supported(*args, **kwargs):
        return list(original(*args, **kwargs)) + ["meta"]

    supported.__wrapped__ = original
    return supported


@contextlib.contextmanager
def meta_workarounds():
    """The three changes the real step needs on meta (see the module's docstring); undone on exit."""
    import torch.nn.functional as F
    import torch.optim.optimizer as optim_mod
    from transformers import masking_utils

    saved = [
        (F, "scaled_dot_product_attention", F.scaled_dot_product_attention),
        (optim_mod, "_get_fused_kernels_supported_devices", optim_mod._get_fused_kernels_supported_devices),
        (masking_utils, "find_packed_sequence_indices", masking_utils.find_packed_sequence_indices),
    ]
    try:
        F.scaled_dot_product_attention = _flash_sdpa(saved[0][2])
        optim_mod._get_fused_kernels_supported_devices = _with_meta(saved[1][2])
        masking_utils.find_packed_sequence_indices = _no_packed_sequences
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


# --- what is simulated ------------------------------------------------------------------------------------


@dataclass
class Setting:
    """One training setting: the model's config, the per-device batch, the weights' dtype and BAdam's keys."""

    config: Any
    name: str
    batch: int = 2
    seq: int = 728
    dtype: torch.dtype = torch.bfloat16
    gradient_checkpointing: bool = True
    task: str = "causal-lm"  # or "sequence-classification"
    badam: dict = field(default_factory=dict)  # BAdamConfig flat keys (switch_every, mode, ...)
    lora_rank: int = 8

    @classmethod
    def from_model(cls, model: str, **kw) -> "Setting":
        from .model_shapes import load_config

        config = load_config(model)
        kw.setdefault("task", "sequence-classification" if config.model_type in ("roberta", "bert") else "causal-lm")
        return cls(config=config, name=model, **kw)

    def badam_keys(self) -> dict:
        keys = dict(self.badam)
        if keys.get("mode", "layer") == "layer":
            # The lowest block first: its backward runs through every layer (the largest of any block).
            keys["switch_mode"] = "ascending"
        else:
            keys.pop("switch_mode", None)  # ratio and lisa draw by themselves
        return keys


def build_model(setting: Setting, device: str | torch.device):
    """The model of `setting` on `device` (meta: no memory), in train mode, checkpointing as set."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ..core.hf_features import enable_activation_checkpointing

    auto = AutoModelForCausalLM if setting.task == "causal-lm" else AutoModelForSequenceClassification
    config = setting.config
    config._attn_implementation = "sdpa"
    if hasattr(config, "use_cache"):
        config.use_cache = False
    with torch.device(device):
        model = auto.from_config(config, dtype=setting.dtype)
    model.train()
    if setting.gradient_checkpointing:
        enable_activation_checkpointing(model, use_reentrant=False)
    return model


def make_inputs(setting: Setting, device) -> dict:
    g = torch.Generator().manual_seed(0)
    vocab = setting.config.vocab_size
    ids = torch.randint(0, vocab, (setting.batch, setting.seq), generator=g).to(device)
    if setting.task == "causal-lm":
        # Every position labelled (shift_labels given): on meta the chunked loss cannot look at the labels and
        # counts every token, so the real run on CPU must label every token too for the two to agree.
        return {"input_ids": ids, "labels": ids, "shift_labels": ids}
    labels = torch.randint(0, max(2, getattr(setting.config, "num_labels", 2)), (setting.batch,), generator=g)
    return {"input_ids": ids, "labels": labels.to(device)}


def _keys(tensors: Iterable[torch.Tensor | None], kind: str, out: dict) -> None:
    for t in tensors:
        if t is not None:
            key = storage_key(t)
            if key is not None:
                out.setdefault(key, kind)


class MixedPrecisionAdamW:
    """The paper's "Adam (mixed precision)" baseline: bf16 weights, fp32 gradients (taken from backward into
    one buffer, as BAdam does), fp32 masters and moments: 18 bytes per parameter. fp32 weights: plain AdamW."""

    def __init__(self, model, lr: float = 1e-5):
        from ..core.masters import flat_like

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.mixed = any(p.dtype != torch.float32 for p in self.params)
        if not self.mixed:
            self.masters, self.inner = self.params, torch.optim.AdamW(self.params, lr=lr, fused=True)
            return
        self.masters = flat_like(self.params, copy=True)
        self.inner = torch.optim.AdamW(self.masters, lr=lr, fused=True)
        self.grads = None
        self._flat_like = flat_like
        for i, p in enumerate(self.params):
            p.register_post_accumulate_grad_hook(lambda p, i=i: self._take(i, p))

    @torch.no_grad()
    def _take(self, i, p):
        if self.grads is None:
            self.grads = self._flat_like(self.params)
        self.grads[i].copy_(p.grad)
        p.grad = None

    @torch.no_grad()
    def step(self):
        if self.mixed:
            for m, g in zip(self.masters, self.grads):
                m.grad = g
        self.inner.step()
        if self.mixed:
            for p, m in zip(self.params, self.masters):
                p.copy_(m)
                m.grad = None
            self.grads = None

    def zero_grad(self):
        self.inner.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None

    def labels(self, out: dict) -> None:
        if self.mixed:
            _keys(self.masters, "masters", out)
            _keys(self.grads or [], "fp32 gradients", out)
        _keys((v for st in self.inner.state.values() for v in st.values() if torch.is_tensor(v)), "moments", out)


def _model_labels(model, out: dict) -> None:
    for n, p in model.named_parameters():
        _keys([p], "adapter weights" if "lora_" in n else "weights", out)
        _keys([p.grad], "fp32 gradients" if p.dtype == torch.float32 else "gradients", out)
    _keys(model.buffers(), "weights", out)


def _badam_labels(opt, out: dict) -> None:
    _keys((opt._block_masters.fp32_grads or {}).values(), "fp32 gradients", out)
    for m in opt._block_masters.masters.values():
        _keys([m.grad], "fp32 gradients", out)
        if m.numel():
            _keys([m], "masters", out)
    for buf in opt._block_masters.buffers:
        _keys(buf.lows or [], "low halves", out)
    _keys((v for st in opt.inner.state.values() for v in st.values() if torch.is_tensor(v)), "moments", out)


def _phase_around(counter: StorageCounter, obj, attr: str, phase: str) -> None:
    """Run obj.attr (a bound method) under `phase` (an instance attribute: the class is untouched)."""
    original = getattr(obj, attr)

    def wrapped(*args, **kwargs):
        previous = counter.phase
        counter.set_phase(phase)
        try:
            return original(*args, **kwargs)
        finally:
            counter.set_phase(previous)

    setattr(obj, attr, wrapped)


def _mark_loss(model, counter: StorageCounter) -> None:
    """Tensors of the LM head and the loss are 'loss temporaries', in forward and in backward until the
    gradient reaches the hidden states below the head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return

    def pre(module, args):
        counter.set_phase("forward: loss")
        x = args[0] if args else None
        if torch.is_tensor(x) and x.requires_grad:
            x.register_hook(lambda g: counter.set_phase("backward"))

    head.register_forward_pre_hook(pre)


def _step(model, inputs, counter, opt, has_head: bool, loss_context=contextlib.nullcontext) -> dict:
    counter.reset_peak()
    counter.set_phase("forward")
    with loss_context():
        loss = model(**inputs).loss  # the outputs (logits) go, as in Trainer.compute_loss
    counter.set_phase("backward: loss" if has_head else "backward")
    loss.backward()
    loss = loss.detach()  # kept through the step, as Trainer keeps it for its running loss
    counter.set_phase("step")
    opt.step()
    opt.zero_grad()
    del loss
    counter.set_phase("after step")
    return _finished(counter)


def _finished(counter) -> dict:
    """End `counter`'s count: its peak, the phase and what was alive there, and the peak of every phase."""
    counter.finish()
    return {"peak_bytes": counter.peak, "phase": counter.peak_phase,
            "alive_at_peak": dict(sorted(counter.peak_alive.items(), key=lambda kv: -kv[1])),
            "peak_bytes_cuda_rounded": counter.peak_rounded, "phase_peaks": dict(counter.phase_peaks)}


def run_method(setting: Setting, method: str, device: str = "meta") -> dict:
    """Build the model on `device`, run the method's steps under a `StorageCounter`; the per-step peaks."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}: choose from {', '.join(METHODS)}.")
    torch.manual_seed(0)
    labels: list[Callable[[dict], None]] = []
    counter = StorageCounter(labeler=lambda: _collect(labels))
    with meta_workarounds():
        # The model is built outside the counter (its storages are registered below): building an 8B model
        # op by op under the mode costs time and nothing built here is a temporary of the step.
        model = build_model(setting, device)
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            targets = ["q_proj", "v_proj"] if setting.config.model_type != "roberta" else ["query", "value"]
            if setting.gradient_checkpointing:
                model.enable_input_require_grads()  # checkpointing with frozen embeddings needs it under LoRA
            model = get_peft_model(model, LoraConfig(r=setting.lora_rank, lora_alpha=2 * setting.lora_rank,
                                                     lora_dropout=0.0, target_modules=targets))
        with counter:
            steps = _run_steps(setting, method, device, model, counter, labels)
    return {"peak_bytes": max(s["peak_bytes"] for s in steps), "steps": steps}


def _run_steps(setting: Setting, method: str, device, model, counter: StorageCounter, labels: list) -> list[dict]:
    counter.track(list(model.parameters()) + list(model.buffers()), pinned=True)
    labels.append(lambda out: _model_labels(model, out))
    has_head = setting.task == "causal-lm"
    if method == "lora":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
        labels.append(lambda out: _keys((v for st in opt.state.values() for v in st.values()
                                         if torch.is_tensor(v)), "moments", out))
    elif method == "adamw":
        opt = MixedPrecisionAdamW(model)
        labels.append(opt.labels)
    else:
        from ..core.config import BAdamConfig
        from ..core.optimizer import BlockOptimizer

        opt = BlockOptimizer(model, BAdamConfig.from_flat(setting.badam_keys(), source="the dry run"), lr=1e-5)
        labels.append(lambda out: _badam_labels(opt, out))
        _phase_around(counter, opt, "_materialize_masters", "step: masters")
        _phase_around(counter, opt.inner, "step", "step: inner AdamW")
        _phase_around(counter, opt, "_write_back", "step: write back")
    _mark_loss(model, counter)
    loss_context = contextlib.nullcontext
    if method == "badam" and has_head and opt.config.chunked_loss:
        # What BAdamTrainer and --optim badam train with (AdamW and LoRA keep the model's own loss).
        from ..integrations.chunked_loss import chunked_causal_lm_loss, unsupported_reason

        if unsupported_reason(model) is None:
            loss_context = functools.partial(chunked_causal_lm_loss, model, opt.config.loss_chunk_tokens)
    counter.set_phase("inputs")
    inputs = make_inputs(setting, device)
    counter.track(inputs.values())
    counter.set_phase("setup")
    steps = []
    if method == "badam":
        K = opt.schedule.switch_every
        names = ["first step of a block"] + ([f"later step (K={K})"] if K >= 2 else [])
    else:
        names = ["step 1", "step 2"]  # the moments exist from the second step on
    save = None
    for name in names:
        steps.append({"step": name, **_step(model, inputs, counter, opt, has_head, loss_context)})
        if method == "badam" and save is None:
            # After a block's first step: mid-visit for K >= 2, where a save finds the most (masters, moments).
            save = {"step": "checkpoint save", **_save(counter, opt)}
    return steps + ([save] if save else [])


def _save(counter: StorageCounter, opt) -> dict:
    """A checkpoint written between two steps (where the Trainer saves): what building the optimizer's state
    dict holds on the device. Its host copies are not device memory: dropped here."""
    from ..core import checkpoint

    counter.reset_peak()
    counter.set_phase("checkpoint save")
    state = checkpoint.state_dict(opt, to_host=lambda t: None)
    del state
    counter.set_phase("after save")
    return _finished(counter)


def _collect(labelers) -> dict:
    out: dict = {}
    for fn in labelers:
        fn(out)
    return out


def dry_run(setting: Setting, methods: Iterable[str] = METHODS, device: str = "meta") -> dict:
    """Every method's per-step peaks; the `badam-hf estimate --exact --json` document."""
    t0 = time.perf_counter()
    out = {"model": setting.name, "batch": setting.batch, "seq": setting.seq, "methods": {}}
    for method in methods:
        out["methods"][method] = run_method(setting, method, device)
    out["wall_s"] = time.perf_counter() - t0
    return out
