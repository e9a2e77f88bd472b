"""Peak live bytes of a causal LM's head + loss (forward and backward), full logits vs chunked, without a GPU.

    python benchmarks/chunked_loss_memory.py                 # the paper's batch: 2 x 728 tokens, Llama 3's head
    python benchmarks/chunked_loss_memory.py --validate      # first check meta == CPU on a small shape, to the byte

Only the head matters for the loss's memory, so the model is its last hidden states (bf16, requiring grad, as
the layers below hand them on) and its head (bf16, frozen as in layer mode, or trained with `--trained-head`).
Tensors are made on the `meta` device (no memory, no compute) and counted by storage identity: every tensor an
aten op returns is recorded under its storage's `_cdata` (a meta storage's data_ptr is 0), and dropped when a
weak reference says the storage is gone. The result is the most bytes alive at once above what was alive
before (hidden states + head), the count a CUDA caching allocator's `max_memory_allocated` would see before
its rounding to 512-byte blocks.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from badam_hf.integrations.chunked_loss import ChunkedHeadLoss


class StorageBytes(TorchDispatchMode):
    """Live bytes by storage identity; works on meta tensors and real ones alike."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def track(self, tensors):
        for t in tensors:
            self._add(t)
        self.peak = max(self.peak, self.current)

    def _add(self, t):
        s = t.untyped_storage()
        ref = StorageWeakRef(s)
        if ref.cdata in self.live and not self.live[ref.cdata][0].expired():
            return
        self.live[ref.cdata] = (ref, s.nbytes())
        self.current += s.nbytes()

    def _sweep(self):
        for k in [k for k, (r, _) in self.live.items() if r.expired()]:
            self.current -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_sparse:
                self._add(t)
        self.peak = max(self.peak, self.current)
        return out


def head_and_loss_peak(method: str, device: str, batch: int, seq: int, hidden: int, vocab: int,
                       chunk: int | None = None, trained_head: bool = False, dtype=torch.bfloat16) -> int:
    """Most bytes alive above the inputs during forward + backward of the loss by `method`."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(0)
    make = (lambda *s, **k: torch.empty(*s, device="meta", **k)) if device == "meta" else \
        (lambda *s, dtype=dtype: (torch.randn(*s, generator=g) * 0.02).to(dtype))
    h = make(batch, seq, hidden, dtype=dtype).requires_grad_(True)
    w = make(vocab, hidden, dtype=dtype).requires_grad_(trained_head)
    if device == "meta":
        labels = torch.empty(batch, seq, dtype=torch.long, device="meta")
    else:
        labels = torch.randint(0, vocab, (batch, seq), generator=g)
    n_items = torch.tensor(batch * (seq - 1), device=device)
    count = StorageBytes()
    count.track([h, w, labels, n_items])
    base = count.current
    with count:
        if method == "full":  # the model's own: lm_head, then ForCausalLMLoss on the full logits
            loss = ForCausalLMLoss(F.linear(h, w), labels, vocab, num_items_in_batch=n_items)
        elif method == "chunked":  # what chunked_causal_lm_loss does (every token labelled)
            shift = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
            index = torch.arange(batch * seq, device=device).view(batch, seq)[:, :-1].reshape(-1)
            loss = ChunkedHeadLoss.apply(h.reshape(-1, hidden).index_select(0, index), w, None,
                                         shift.index_select(0, index), chunk) / n_items
        elif method == "trl":  # TRL 1.16's fused head kernel as SFTTrainer calls it (torch path: no Triton here)
            from trl.kernels import ChunkedLogProbFunction

            is_autocast_enabled = torch.is_autocast_enabled
            # TRL asks autocast about the tensors' device, which meta has none of: answer "off" for meta only.
            torch.is_autocast_enabled = lambda *d: False if d and d[0] == "meta" else is_autocast_enabled(*d)
            try:
                logp, entropy, *_ = ChunkedLogProbFunction.apply(
                    h[:, :-1].reshape(-1, hidden), w, None, labels[:, 1:].reshape(-1), 1.0, chunk or 32768, None,
                    1.0, ("log_probs", "entropy", "is_top1"))
                loss = -logp.sum() / n_items
                loss.backward()
            finally:
                torch.is_autocast_enabled = is_autocast_enabled
            return count.peak - base
        else:
            raise ValueError(method)
        loss.backward()
    return count.peak - base


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=728)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--chunks", default="128,256,512,1024,32768")
    ap.add_argument("--trained-head", action="store_true")
    ap.add_argument("--trl", action="store_true", help="also TRL's fused head (its torch path)")
    ap.add_argument("--validate", action="store_true", help="meta == CPU on a small shape first")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.validate:
        small = dict(batch=2, seq=64, hidden=32, vocab=1024, trained_head=a.trained_head)
        for method, chunk in (("full", None), ("chunked", 16), ("chunked", 4096)):
            m = head_and_loss_peak(method, "meta", chunk=chunk, **small)
            c = head_and_loss_peak(method, "cpu", chunk=chunk, **small)
            print(f"validate {method:8s} chunk={chunk}: meta {m:,} B, cpu {c:,} B, {'equal' if m == c else 'DIFFER'}")
    shape = dict(batch=a.batch, seq=a.seq, hidden=a.hidden, vocab=a.vocab, trained_head=a.trained_head)
    rows = [("full", None, head_and_loss_peak("full", "meta", **shape))]
    for c in map(int, a.chunks.split(",")):
        rows.append(("chunked", c, head_and_loss_peak("chunked", "meta", chunk=c, **shape)))
    if a.trl:
        rows.append(("trl", 32768, head_and_loss_peak("trl", "meta", chunk=32768, **shape)))
    logits = a.batch * a.seq * a.vocab * 4
    print(f"batch {a.batch} x seq {a.seq}, hidden {a.hidden}, vocab {a.vocab}, head "
          f"{'trained' if a.trained_head else 'frozen'}; one fp32 logits tensor = {logits / 1e6:.1f} MB")
    for method, chunk, peak in rows:
        print(f"{method:8s} {'' if chunk is None else chunk:>6}  peak above inputs {peak / 1e6:9.1f} MB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": shape, "rows": [{"method": m, "chunk": c, "peak_bytes": p} for m, c, p in rows]}, f,
                      indent=1)


if __name__ == "__main__":
    main()
