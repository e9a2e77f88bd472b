"""The chunked causal-LM training loss (`integrations.chunked_loss`): same loss and gradients as the model's own,
the Trainer's normalisation kept, evaluation untouched, switchable, and no full logits alive."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

from badam_hf import BAdamConfig, BAdamConfigError, BAdamTrainer, make_badam_trainer
from badam_hf.integrations import chunked_loss as cl
from badam_hf.integrations.chunked_loss import ChunkedHeadLoss, chunked_causal_lm_loss, unsupported_reason
from badam_hf.tools.live_memory import LiveTensorBytes

VOCAB = 64


def _batch(seed=0, batch=3, seq=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[1, -3:] = -100  # padding
    return ids, labels


def _loss_and_grads(model, ids, labels, chunk=None, **kw):
    model.zero_grad(set_to_none=True)
    if chunk is None:
        loss = model(input_ids=ids, labels=labels, **kw).loss
    else:
        with chunked_causal_lm_loss(model, chunk):
            loss = model(input_ids=ids, labels=labels, **kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


BUILDS = {
    "llama": lambda m, dtype: m["tiny_llama"](2, dtype=dtype, train=True),
    "llama_tied": lambda m, dtype: m["tiny_llama"](2, dtype=dtype, train=True, tie_word_embeddings=True),
    "qwen2": lambda m, dtype: m["tiny_qwen2"](2, dtype=dtype, train=True),
    "gpt2_tied": lambda m, dtype: m["tiny_gpt2"](2, dtype=dtype, train=True),
}


@pytest.fixture
def builders(tiny_llama, tiny_qwen2, tiny_gpt2):
    return {"tiny_llama": tiny_llama, "tiny_qwen2": tiny_qwen2, "tiny_gpt2": tiny_gpt2}


@pytest.mark.parametrize("family", sorted(BUILDS))
@pytest.mark.parametrize("chunk", [1, 7, 4096])
@pytest.mark.parametrize("num_items", [None, 40])
def test_fp32_loss_and_grads_equal_the_models_own(builders, family, chunk, num_items):
    model = BUILDS[family](builders, torch.float32)
    assert unsupported_reason(model) is None
    ids, labels = _batch()
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    ref_loss, ref = _loss_and_grads(model, ids, labels, **kw)
    loss, got = _loss_and_grads(model, ids, labels, chunk=chunk, **kw)
    # Same per-token fp32 log-softmax; only the order of the sum over tokens (and over chunks of the head's
    # weight gradient) differs: a few fp32 ulps.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert got.keys() == ref.keys()  # tied heads and the embeddings included
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)
    assert "forward" not in vars(model.get_output_embeddings()) and "_loss_function" not in vars(model)


@pytest.mark.parametrize("family", ["llama", "gpt2_tied"])
def test_bf16_loss_and_grads_within_rounding(builders, family):
    model = BUILDS[family](builders, torch.bfloat16)
    ids, labels = _batch(1)
    ref_loss, ref = _loss_and_grads(model, ids, labels, num_items_in_batch=torch.tensor(25))
    loss, got = _loss_and_grads(model, ids, labels, chunk=5, num_items_in_batch=torch.tensor(25))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)  # the loss is fp32 in both
    for n in ref:
        # bf16 gradients: the head's weight gradient is summed over chunks in fp32 and rounded once.
        torch.testing.assert_close(got[n].float(), ref[n].float(), rtol=2 ** -7, atol=1e-6, msg=n)


def test_frozen_head_gets_no_gradient_and_hidden_gradient_is_the_models(tiny_llama):
    model = tiny_llama(2, train=True)
    model.lm_head.requires_grad_(False)  # layer mode: the head is not in the active block
    ids, labels = _batch(2)
    ref_loss, ref = _loss_and_grads(model, ids, labels)
    loss, got = _loss_and_grads(model, ids, labels, chunk=3)
    assert "lm_head.weight" not in got
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)


def test_shift_labels_and_all_ignored_rows(tiny_llama):
    model = tiny_llama(2, train=True)
    ids, labels = _batch(3)
    shifted = torch.roll(labels, -1, 1)
    shifted[:, -1] = -100
    shifted[2] = -100  # a row without any label
    ref_loss, ref = _loss_and_grads(model, ids, labels, shift_labels=shifted)
    loss, got = _loss_and_grads(model, ids, labels, chunk=4, shift_labels=shifted)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)
    # A micro-batch with no label at all: 0 under num_items_in_batch (HF: sum 0 / n), still differentiable.
    none = torch.full_like(labels, -100)
    loss, got = _loss_and_grads(model, ids, none, chunk=4, num_items_in_batch=torch.tensor(7))
    assert loss.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in got.values())


def test_unsupported_models_keep_their_own_loss(tiny_llama):
    model = tiny_llama(1)
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in unsupported_reason(model)
    model = tiny_llama(1)
    model.loss_function = lambda *a, **k: None
    assert "ForCausalLMLoss" in unsupported_reason(model)


def test_a_model_that_changes_its_logits_is_refused_not_miscomputed(tiny_llama):
    model = tiny_llama(1, train=True)
    original = type(model.lm_head).forward

    class Scaled(torch.nn.Module):  # stands for a family that rescales its logits after the head
        def forward(self, x):
            return x * 2.0

    ids, labels = _batch()
    with chunked_causal_lm_loss(model, 4):
        head_forward = model.lm_head.forward
        model.lm_head.forward = lambda h: Scaled()(head_forward(h))
        with pytest.raises(RuntimeError, match="chunked_loss=false"):
            model(input_ids=ids, labels=labels)
        model.lm_head.forward = head_forward
    assert type(model.lm_head).forward is original
    # A forward without labels inside the context would hand back placeholder logits: refused as well.
    with pytest.raises(RuntimeError, match="loss function was not called"):
        with chunked_causal_lm_loss(model, 4):
            model(input_ids=ids)
    assert "forward" not in vars(model.lm_head) and "_loss_function" not in vars(model)


def test_no_full_logits_are_alive(tiny_llama):
    """The head and loss of 2 x 96 tokens over a 4096-word vocabulary: the model's own loss holds several
    fp32 tensors of tokens x vocabulary; the chunked one less than one of them."""
    tokens, vocab, hidden = 2 * 96, 4096, 32
    logits_bytes = tokens * vocab * 4
    model = tiny_llama(1, vocab=vocab, hidden=hidden, max_positions=128, train=True)
    model.requires_grad_(False)
    ids = torch.randint(0, vocab, (2, 96))

    def peak(chunk):
        hidden_states = model.model(input_ids=ids).last_hidden_state.detach().requires_grad_(True)
        live = LiveTensorBytes()
        live.track([hidden_states, *model.parameters()], "inputs")
        base = live.current
        with live:
            with live.phase("loss"):
                if chunk is None:
                    loss = model.loss_function(model.lm_head(hidden_states), ids, vocab)
                else:
                    shift = torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:].reshape(-1)
                    keep = shift != -100
                    loss = ChunkedHeadLoss.apply(hidden_states.reshape(-1, hidden)[keep], model.lm_head.weight, None,
                                                 shift[keep], chunk) / keep.sum()
                loss.backward()
        return live.peak - base

    full, chunked = peak(None), peak(32)
    assert full > 2 * logits_bytes
    assert chunked < logits_bytes // 2
    assert chunked <= 10 * 32 * vocab * 4  # a few fp32 tensors of chunk x vocabulary


# --- through the Trainer ---------------------------------------------------------------------------


def _data(n=16, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, seq), generator=g)
    rows = []
    for i, x in enumerate(ids):
        labels = x.clone()
        labels[: (i % 5) + 1] = -100  # prompts of different lengths: num_items_in_batch matters
        rows.append({"input_ids": x, "labels": labels})
    return rows


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2,
                gradient_accumulation_steps=2, learning_rate=1e-2, report_to="none", use_cpu=True,
                save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


class _Count:
    def __init__(self, monkeypatch):
        self.calls = 0
        apply = ChunkedHeadLoss.apply

        def counted(*a):
            self.calls += 1
            return apply(*a)

        monkeypatch.setattr(ChunkedHeadLoss, "apply", counted)


def _train(trainer):
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("plain", [False, True], ids=["BAdamTrainer", "Trainer_optim_badam"])
def test_trainer_with_accumulation_matches_the_models_own_loss(tmp_path, tiny_llama, monkeypatch, plain):
    optim_args = "switch_every=2,switch_mode=ascending,include_lm_head=true"

    def run(chunked, count=None):
        model = tiny_llama(2, train=True)
        args = _args(tmp_path, optim="badam", optim_args=f"{optim_args},chunked_loss={chunked},loss_chunk_tokens=5",
                     max_steps=6)
        cls = Trainer if plain else BAdamTrainer
        return _train(cls(model=model, args=args, train_dataset=_data()))

    count = _Count(monkeypatch)
    ref_losses, ref_params = run("false")
    assert count.calls == 0
    losses, params = run("true")
    assert count.calls == 6 * 2  # every micro-batch of every step
    # The head block trains too (include_lm_head): a trained head's gradient goes through the chunks.
    assert not torch.equal(params["lm_head.weight"], tiny_llama(2).lm_head.weight)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for n in ref_params:
        # Adam divides by sqrt(v): an entry whose gradient is ~0 turns an fp32 ulp of the loss's rounding into a
        # visible step, so a few entries move by up to 1% of the lr; the rest by fp32 rounding.
        d = (params[n] - ref_params[n]).abs()
        assert d.max() <= 1e-4 and (d > 1e-6).float().mean() < 0.01, n


def test_switch_off_is_bit_identical_to_the_trainers_own_loss(tmp_path, tiny_llama):
    class Today(BAdamTrainer):  # the loss as before chunking existed
        def compute_loss(self, model, inputs, *a, **kw):
            return Trainer.compute_loss(self, model, inputs, *a, **kw)

    def run(cls, optim_args):
        model = tiny_llama(2, train=True)
        args = _args(tmp_path, optim_args=optim_args)
        return _train(cls(model=model, args=args, train_dataset=_data()))

    ref_losses, ref_params = run(Today, "switch_every=2,chunked_loss=true")
    losses, params = run(BAdamTrainer, "switch_every=2,chunked_loss=false")
    assert losses == ref_losses
    assert all(torch.equal(params[n], ref_params[n]) for n in ref_params)


def test_evaluation_and_metrics_get_full_logits(tmp_path, tiny_llama, monkeypatch):
    count = _Count(monkeypatch)
    seen = {}

    def metrics(pred):
        seen["shape"] = pred.predictions.shape
        return {"n": float(pred.predictions.size)}

    model = tiny_llama(2, train=True)
    data = _data(8)
    trainer = BAdamTrainer(model=model, args=_args(tmp_path, max_steps=1, per_device_eval_batch_size=4),
                           train_dataset=data, eval_dataset=data, compute_metrics=metrics)
    trainer.train()
    assert count.calls == 2
    pred = trainer.predict(data)
    assert count.calls == 2  # prediction never chunks
    assert pred.predictions.shape == seen["shape"] == (8, 12, VOCAB)
    seen.clear()
    trainer.evaluate()
    assert count.calls == 2 and seen["shape"] == (8, 12, VOCAB)
    model.eval()
    with torch.no_grad():
        ids = torch.stack([r["input_ids"] for r in data])
        labels = torch.stack([r["labels"] for r in data])
        logits = model(input_ids=ids).logits
        losses = [model(input_ids=ids[i:i + 4], labels=labels[i:i + 4]).loss.item() for i in (0, 4)]
    torch.testing.assert_close(torch.as_tensor(pred.predictions), logits)
    assert pred.metrics["test_loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)  # the model's own loss


def test_trl_sft_trainer_is_left_alone(tmp_path, tiny_llama, monkeypatch):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    count = _Count(monkeypatch)
    words = "the a cat dog sat ran on under mat log".split()
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *words])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[j] for j in torch.randint(0, len(words), (8,), generator=g).tolist()) for _ in range(8)]
    ds = datasets.Dataset.from_dict({"text": texts})
    model = tiny_llama(2, vocab=len(tok), pad_token_id=0, eos_token_id=2)
    cfg = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4,
                        learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
                        disable_tqdm=True, max_length=16, optim="badam", optim_args="switch_every=1")
    trainer = make_badam_trainer(trl.SFTTrainer)(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    trainer.train()
    assert count.calls == 0
    assert "TRL" in trainer._badam_chunk_note
    assert "forward" in vars(model)  # TRL's fused head is still there


def test_config_keys():
    cfg = BAdamConfig.from_optim_args("chunked_loss=false,loss_chunk_tokens=128")
    assert cfg.chunked_loss is False and cfg.loss_chunk_tokens == 128
    assert BAdamConfig().chunked_loss is True and BAdamConfig().loss_chunk_tokens == cl.DEFAULT_LOSS_CHUNK_TOKENS
    for bad in ("loss_chunk_tokens=0", "loss_chunk_tokens=-3", "loss_chunk_tokens=many", "chunked_loss=maybe"):
        with pytest.raises(BAdamConfigError, match=bad.split("=")[0]):
            BAdamConfig.from_optim_args(bad)
