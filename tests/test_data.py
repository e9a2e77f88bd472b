"""Alpaca SFT data: prompt format, label masking token by token, truncation, errors, split, tokenizer."""

import json
from pathlib import Path

import pytest
import torch

from badam_hf.data.sft import (
    IGNORE_INDEX,
    SFTCollator,
    alpaca_texts,
    build_local_tokenizer,
    format_alpaca,
    load_alpaca_json,
    tokenize_sft,
    train_val_split,
)

SHARED_ALPACA = Path(__file__).resolve().parents[2] / "shared/data/alpaca_en_demo.json"

RECORDS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5"},
    {"instruction": "Reverse the word.", "input": "cat", "output": "tac"},
    {"instruction": "Write the word in capital letters.", "input": "dog", "output": "DOG"},
    {"instruction": "Name a colour.", "output": "green"},  # no `input` key at all
]


@pytest.fixture(scope="module")
def tok():
    texts = alpaca_texts(RECORDS) + ["The quick brown fox jumps over the lazy dog. 0123456789"] * 3
    return build_local_tokenizer(texts, vocab_size=300)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_format_alpaca_sections():
    prompt, response = format_alpaca(RECORDS[1])
    assert "### Instruction:\nReverse the word." in prompt
    assert "### Input:\ncat" in prompt
    assert prompt.endswith("### Response:\n")
    assert response == "tac"
    for rec in (RECORDS[0], RECORDS[3]):  # empty and missing input: no Input section
        prompt, _ = format_alpaca(rec)
        assert "### Input:" not in prompt
        assert prompt.endswith("### Response:\n")


def test_labels_mask_prompt_token_by_token(tok):
    feats = tokenize_sft(RECORDS, tok, cutoff_len=512)
    for i, rec in enumerate(RECORDS):
        prompt, response = format_alpaca(rec)
        p, r = _ids(tok, prompt), _ids(tok, response)
        ids, labels, mask = feats["input_ids"][i], feats["labels"][i], feats["attention_mask"][i]
        assert ids == p + r + [tok.eos_token_id]
        assert len(labels) == len(ids) == len(mask)
        assert mask == [1] * len(ids)
        for pos in range(len(p)):
            assert labels[pos] == IGNORE_INDEX, (i, pos)
        for pos in range(len(p), len(ids)):
            assert labels[pos] == ids[pos], (i, pos)
        assert ids[-1] == labels[-1] == tok.eos_token_id  # EOS appended and trained on


def test_bos_is_prepended_and_masked(tok):
    feats = tokenize_sft(RECORDS[:1], tok, cutoff_len=512, add_bos=True)
    assert feats["input_ids"][0][0] == tok.bos_token_id
    assert feats["labels"][0][0] == IGNORE_INDEX


def test_truncation_at_cutoff(tok):
    rec = RECORDS[1]
    prompt, response = format_alpaca(rec)
    p, r = _ids(tok, prompt), _ids(tok, response)
    full = p + r + [tok.eos_token_id]
    # Cut inside the response: the prompt stays masked, the kept response tokens stay labelled, EOS is gone.
    cut = len(p) + 1
    feats = tokenize_sft([rec], tok, cutoff_len=cut)
    assert feats["input_ids"][0] == full[:cut]
    assert feats["labels"][0] == [IGNORE_INDEX] * len(p) + full[len(p) : cut]
    assert feats["attention_mask"][0] == [1] * cut
    # Cut inside the prompt: nothing is labelled.
    feats = tokenize_sft([rec], tok, cutoff_len=3)
    assert feats["input_ids"][0] == full[:3]
    assert feats["labels"][0] == [IGNORE_INDEX] * 3
    with pytest.raises(ValueError, match="cutoff_len"):
        tokenize_sft([rec], tok, cutoff_len=0)


@pytest.mark.parametrize("missing", ["instruction", "output"])
def test_missing_field_names_field_and_index(tok, missing):
    bad = [dict(r) for r in RECORDS]
    del bad[2][missing]
    with pytest.raises(ValueError, match=rf"record 2 has no '{missing}' field"):
        tokenize_sft(bad, tok, cutoff_len=64)


def test_wrong_type_is_an_error(tok):
    with pytest.raises(ValueError, match=r"record 1: field 'output' must be a string"):
        tokenize_sft([RECORDS[0], {"instruction": "x", "output": 5}], tok, cutoff_len=64)
    with pytest.raises(ValueError, match=r"record 0 is a list"):
        tokenize_sft([["x"]], tok, cutoff_len=64)


def test_collator_pads_to_batch_max(tok):
    feats = tokenize_sft(RECORDS[:3], tok, cutoff_len=512)
    batch = SFTCollator(tok.pad_token_id)([{k: v[i] for k, v in feats.items()} for i in range(3)])
    width = max(len(x) for x in feats["input_ids"])
    for i in range(3):
        n = len(feats["input_ids"][i])
        assert batch["input_ids"][i, :n].tolist() == feats["input_ids"][i]
        assert batch["labels"][i, :n].tolist() == feats["labels"][i]
        assert torch.all(batch["input_ids"][i, n:] == tok.pad_token_id)
        assert torch.all(batch["labels"][i, n:] == IGNORE_INDEX)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
    assert batch["input_ids"].shape == (3, width) and batch["input_ids"].dtype == torch.long


def test_load_json_and_jsonl(tmp_path):
    as_list = tmp_path / "a.json"
    as_list.write_text(json.dumps(RECORDS))
    as_lines = tmp_path / "a.jsonl"
    as_lines.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    assert load_alpaca_json(as_list) == RECORDS
    assert load_alpaca_json(as_lines) == RECORDS
    broken = tmp_path / "b.jsonl"
    broken.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"b.jsonl:2 is not valid JSON"):
        load_alpaca_json(broken)
    missing = tmp_path / "c.json"
    missing.write_text(json.dumps([RECORDS[0], {"instruction": "x"}]))
    with pytest.raises(ValueError, match=r"record 1 has no 'output' field"):
        load_alpaca_json(missing)


def test_split_is_deterministic_and_disjoint():
    items = list(range(100))
    train, val = train_val_split(items, 0.2, seed=3)
    assert (train, val) == train_val_split(items, 0.2, seed=3)
    assert len(val) == 20 and len(train) == 80
    assert sorted(train + val) == items
    assert val != train_val_split(items, 0.2, seed=4)[1]
    train0, val0 = train_val_split(items, 0.0, seed=3)
    assert val0 == [] and sorted(train0) == items
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(items, 1.0)


def test_tokenizer_round_trip_and_determinism(tok):
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, 2, 3)
    for text in ["Reverse the word.\n\ncat", "Zebra! ünïcödé  spaces\t42", "### Response:\n2 + 3 = 5"]:
        assert tok.decode(_ids(tok, text)) == text
    again = build_local_tokenizer(alpaca_texts(RECORDS) + ["The quick brown fox jumps over the lazy dog. 0123456789"] * 3, 300)
    assert again.get_vocab() == tok.get_vocab()
    assert _ids(again, "Add 2 and 3.") == _ids(tok, "Add 2 and 3.")
    # Training learned merges: a frequent word takes fewer tokens than its bytes.
    assert len(_ids(tok, "Reverse")) < len("Reverse")


@pytest.mark.skipif(not SHARED_ALPACA.exists(), reason=f"{SHARED_ALPACA} is absent")
def test_real_alpaca_file():
    records = load_alpaca_json(SHARED_ALPACA)
    assert len(records) == 999
    assert all({"instruction", "output"} <= set(r) for r in records)
    subset = records[:64]
    tok = build_local_tokenizer(alpaca_texts(subset), vocab_size=800)
    feats = tokenize_sft(subset, tok, cutoff_len=128)
    assert len(feats["input_ids"]) == 64
    for i, rec in enumerate(subset):
        ids, labels = feats["input_ids"][i], feats["labels"][i]
        n_prompt = len(_ids(tok, format_alpaca(rec)[0]))
        assert len(ids) == min(128, n_prompt + len(_ids(tok, rec["output"])) + 1)
        assert all(l == IGNORE_INDEX for l in labels[: min(n_prompt, 128)])
        assert labels[n_prompt:] == ids[n_prompt:]
    # Some real records are longer than the cutoff and some with an input get the Input section.
    assert any(len(x) == 128 for x in feats["input_ids"])
    assert any("### Input:" in format_alpaca(r)[0] for r in subset)
    train, val = train_val_split(records, 0.1, seed=0)
    assert len(val) == 100 and len(train) == 899


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_chat_template_masks_the_whole_templated_prompt():
    chat_tok = build_local_tokenizer(alpaca_texts(RECORDS) + ["<|user|><|assistant|>"] * 3, vocab_size=300)
    chat_tok.chat_template = CHAT_TEMPLATE
    feats = tokenize_sft(RECORDS[1:2], chat_tok, cutoff_len=256, template="chat")
    prompt = chat_tok.bos_token + "<|user|>Reverse the word.\n\ncat\n<|assistant|>"
    prompt_ids = _ids(chat_tok, prompt)
    response_ids = _ids(chat_tok, "tac") + [chat_tok.eos_token_id]
    assert feats["input_ids"][0] == prompt_ids + response_ids
    assert feats["labels"][0] == [IGNORE_INDEX] * len(prompt_ids) + response_ids


def test_chat_template_needs_a_tokenizer_with_one(tok):
    with pytest.raises(ValueError, match="chat template"):
        tokenize_sft(RECORDS[:1], tok, template="chat")
    with pytest.raises(ValueError, match="template 'nope' is not valid"):
        tokenize_sft(RECORDS[:1], tok, template="nope")
