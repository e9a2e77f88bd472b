"""The causal-LM training loss in chunks of tokens, so the batch's full logits never exist.

A causal LM's own loss projects every position onto the vocabulary (`lm_head`), upcasts those logits to fp32
and takes the cross-entropy: at the peak of the backward, three tensors of batch x seq x vocab x 4 bytes are
alive (747 MB each for Llama 3 at 2 x 728 tokens, vocab 128256). Here the model runs its own forward, but its
head only hands its input (the last hidden states) on, and the loss function it calls with the labels gets the
loss from `ChunkedHeadLoss`: the head and the cross-entropy chunk by chunk over the labelled tokens, each chunk
recomputed in backward. Everything else of the model's forward is kept: the label shift, `shift_labels`,
`ignore_index`, `num_items_in_batch` (the Trainer's normalisation across gradient accumulation), MoE auxiliary
losses added after the loss. Only training uses it: evaluation and prediction get the model's full logits.

What differs from the model's own loss is rounding: per token the same fp32 log-softmax is taken, but the
token losses are summed chunk by chunk; a trained head's gradient is one matmul over all tokens per slice of
the vocabulary (rounded once, like the model's), and the hidden states' gradient then sums the slices in fp32.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# Tokens per chunk when `loss_chunk_tokens` is not given: see docs/memory-chunked-loss.md for the measurement
# (Llama 3 head at 2 x 728 tokens, frozen: 287 MB alive at the peak at 256 tokens, against 2,241 MB unchunked).
DEFAULT_LOSS_CHUNK_TOKENS = 256

# Config attributes under which a causal LM transforms its logits after the head (softcapping, scaling): the
# chunked loss would miss the transform, so those models keep their own loss.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                     "lm_head_multiplier")


def _autocast_dtype(device: torch.device):
    """Autocast's dtype on `device` when it is on, else None (devices without autocast, such as meta: None)."""
    try:
        return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    except RuntimeError:
        return None


def _no_autocast(device: torch.device):
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type without autocast (meta)
        return contextlib.nullcontext()


def _head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype) -> torch.Tensor:
    """What `lm_head(hidden)` computes (in `dtype`: the weight's, or autocast's when it is on), as fp32."""
    with _no_autocast(hidden.device):
        logits = F.linear(hidden.to(dtype), weight, bias)
    return logits.float()


def _in_dtype(t: torch.Tensor | None, dtype) -> torch.Tensor | None:
    # Once per call, not per chunk: under autocast (fp32 weights, bf16 compute) this is one copy of the head.
    return None if t is None else t.to(dtype)


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b without rounding the product to a and b's dtype first. CUDA (and meta) take bf16
    operands with an fp32 output; elsewhere (CPU) the operands are upcast first."""
    if a.dtype in (torch.bfloat16, torch.float16):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):  # no fp32-output matmul on this device / torch
            pass
    acc.addmm_(a.float(), b.float())


class ChunkedHeadLoss(torch.autograd.Function):
    """sum over tokens of cross_entropy(lm_head(hidden), targets), about `chunk` x vocabulary logits at a time.

    `hidden` [N, H] holds only labelled tokens, `targets` [N] their labels. Per chunk of tokens the logits are
    computed as the head computes them and upcast to fp32, like the model's own loss. The backward recomputes
    them and turns them into the gradient (softmax - one-hot) x the incoming gradient:
    - frozen head (layer mode): chunk by chunk of tokens, only the hidden states' gradient; per token the
      same log-softmax as the model's, so each row of the gradient is computed as the model's is;
    - trained or tied head: slice by slice of the vocabulary over all tokens (softmax from the forward's
      log-sum-exp), so each slice of the head's gradient is one matmul over all tokens, rounded once like the
      model's, with no fp32 copy of the head's gradient; the hidden states' gradient is summed over the
      slices in fp32 and rounded once.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int):
        device = hidden.device
        dtype = _autocast_dtype(device) or weight.dtype
        by_vocab = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=device)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=device) if by_vocab else None
        w, b = _in_dtype(weight, dtype), _in_dtype(bias, dtype)
        for start in range(0, hidden.shape[0], chunk):
            logits = _head_logits(hidden[start:start + chunk], w, b, dtype)
            # The same kernel as the model's cross_entropy (log-softmax, then the target's entry) row by row.
            logp = torch.log_softmax(logits, dim=-1)
            total -= logp.gather(1, targets[start:start + chunk, None]).sum()
            del logp
            if by_vocab:
                lse[start:start + chunk] = torch.logsumexp(logits, dim=-1)
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g = grad_total.float()
        w, b = _in_dtype(weight, dtype), _in_dtype(bias, dtype)
        if not (need_w or need_b):
            grad_h = torch.empty_like(hidden) if need_h else None
            for start in range(0, hidden.shape[0] if need_h else 0, chunk):
                h, y = hidden[start:start + chunk], targets[start:start + chunk]
                grad = torch.log_softmax(_head_logits(h, w, b, dtype), dim=-1)
                # d(-log p_y)/dz = softmax - one_hot(y), times the incoming gradient (log-softmax's backward).
                grad.exp_().mul_(g)
                grad.scatter_add_(1, y[:, None], (-g).expand(y.shape[0], 1).contiguous())
                grad = grad.to(dtype)  # the head's output dtype: the gradient flows back through it in that dtype
                with _no_autocast(hidden.device):
                    grad_h[start:start + chunk] = grad @ w
                del grad
            return grad_h, None, None, None, None

        n, vocab = hidden.shape[0], weight.shape[0]
        width = max(1, -(-chunk * vocab // max(n, 1)))  # slices of about chunk x vocabulary logits
        h = hidden.to(dtype)
        acc_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None
        for v0 in range(0, vocab, width):
            v1 = min(v0 + width, vocab)
            grad = _head_logits(h, w[v0:v1], None if b is None else b[v0:v1], dtype)
            grad.sub_(lse[:, None]).exp_().mul_(g)
            local = targets - v0
            inside = (local >= 0) & (local < v1 - v0)
            grad.scatter_add_(1, local.clamp(0, v1 - v0 - 1)[:, None], (inside * -g)[:, None])
            grad = grad.to(dtype)
            with _no_autocast(hidden.device):
                if need_w:
                    torch.mm(grad.t(), h, out=grad_w[v0:v1])  # straight into the gradient: no slice-sized copy
                if need_b:
                    grad_b[v0:v1] = grad.sum(0, dtype=torch.float32)
                if need_h:
                    _addmm_fp32(acc_h, grad, w[v0:v1])
            del grad
        return None if acc_h is None else acc_h.to(hidden.dtype), grad_w, grad_b, None, None


def causal_lm_of(model: nn.Module) -> nn.Module | None:
    """The transformers causal LM inside `model` (DDP / PEFT wrappers removed), or None."""
    from transformers import PreTrainedModel

    inner = getattr(model, "module", model)  # DDP, DataParallel
    get_base = getattr(inner, "get_base_model", None)  # PEFT
    if callable(get_base):
        inner = get_base()
    return inner if isinstance(inner, PreTrainedModel) else None


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `model`'s loss cannot be chunked (it then keeps its own), or None when it can."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    lm = causal_lm_of(model)
    if lm is None:
        return f"{type(model).__name__} is not a transformers model"
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return f"its output head is {type(head).__name__}, not a plain nn.Linear"
    if "forward" in vars(head) or "forward" in vars(lm):
        return "its head's or model's forward was replaced (a fused head such as TRL's or Liger's)"
    if "_loss_function" in vars(lm) or lm.loss_function is not LOSS_MAPPING.get("ForCausalLM"):
        return "its loss function is not transformers' ForCausalLMLoss"
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    transforms = [name for name in _LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]
    if transforms:
        return f"it transforms its logits after the head ({', '.join(transforms)})"
    weight = head.weight
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor) or hasattr(weight, "ds_id"):
        return "its head is sharded (FSDP2 / DeepSpeed ZeRO-3)"
    return None


class _Capture:
    """The head's replacement for one forward: keeps its input, returns a placeholder of the logits' shape."""

    def __init__(self, head: nn.Linear):
        self.head, self.hidden, self.placeholder = head, None, None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        w = self.head.weight
        # No memory: every entry is the one NaN (anything computed from it shows). The model only hands it to
        # its loss function (below).
        self.placeholder = torch.full((), float("nan"), dtype=w.dtype, device=hidden.device).expand(
            *hidden.shape[:-1], w.shape[0])
        return self.placeholder


@contextlib.contextmanager
def chunked_causal_lm_loss(model: nn.Module, chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS):
    """Within this context, a forward of `model` with `labels` computes its loss in chunks of tokens (see the
    module docstring). Check `unsupported_reason(model)` first. Restores the model on exit."""
    lm = causal_lm_of(model)
    head = lm.get_output_embeddings()
    capture = _Capture(head)

    def loss_function(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, **kwargs):
        if capture.hidden is None or logits is not capture.placeholder:
            capture.hidden = capture.placeholder = None  # this error is the one to report
            raise RuntimeError(
                f"chunked loss: {type(lm).__name__} changed its logits between the head and the loss, so the chunked "
                "loss would be wrong; set chunked_loss=false in the BAdam settings (optim_args) for this model."
            )
        hidden = capture.hidden
        if shift_labels is None:  # the model's own shift: position t predicts label t + 1, the last predicts none
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        shift_labels = shift_labels.reshape(-1).to(hidden.device)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        keep = shift_labels != ignore_index
        # Only labelled tokens are projected (their rows of the gradient; the others get zeros, as in the model's).
        if hidden.device.type == "meta":  # a dry run has no labels to look at: count every token as labelled
            index = torch.arange(keep.shape[0], device=hidden.device)
        else:
            index = keep.nonzero().squeeze(1)
        total = ChunkedHeadLoss.apply(hidden.index_select(0, index), head.weight, head.bias,
                                      shift_labels.index_select(0, index), chunk_tokens)
        capture.hidden = capture.placeholder = None
        if num_items_in_batch is None:  # the model's "mean": over the labelled tokens (0/0 = nan when none)
            return total / keep.sum()
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch

    head.forward = capture
    lm.loss_function = loss_function  # the property's setter: an instance attribute `_loss_function`
    try:
        yield
    finally:
        del head.forward
        del lm._loss_function
    if capture.hidden is not None:
        raise RuntimeError(
            f"chunked loss: {type(lm).__name__}'s head ran but its loss function was not called with the labels, so "
            "its logits were never computed; set chunked_loss=false in the BAdam settings (optim_args)."
        )
