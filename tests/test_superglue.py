"""SuperGLUE formatters, tokenisation/collation and metrics on hand-written records."""

import numpy as np
import pytest
import torch

from badam_hf.data import superglue as sg
from badam_hf.data.superglue import SuperGlueFormatError

BOOLQ = {"question": "is the sky blue", "passage": "The sky is blue on clear days.", "label": True}
RTE = {"premise": "A cat sat on the mat.", "hypothesis": "An animal sat.", "label": "entailment"}
COPA = {"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
        "choice2": "He got a hole in his sock.", "question": "cause", "label": 0}
WIC = {"word": "bank", "sentence1": "I sat on the river bank.", "sentence2": "The bank raised its rates.",
       "start1": 19, "end1": 23, "start2": 4, "end2": 8, "label": False}
WSC = {"text": "Mark told Pete many lies about himself, which Pete included in his book.",
       "target": {"span1_text": "Pete", "span1_index": 2, "span2_text": "his", "span2_index": 11}, "label": True}
MULTIRC = {"paragraph": "Tom has two dogs.", "question": "How many dogs?", "answer": "Two",
           "idx": {"paragraph": 0, "question": 0, "answer": 0}, "label": 1}


def test_boolq_rte_pairs_and_labels():
    assert sg.format_record("boolq", BOOLQ) == (("is the sky blue", "The sky is blue on clear days."), 1)
    assert sg.format_record("boolq", {**BOOLQ, "label": 0})[1] == 0
    assert sg.format_record("rte", RTE) == (("A cat sat on the mat.", "An animal sat."), 0)
    assert sg.format_record("rte", {**RTE, "label": "not_entailment"})[1] == 1
    assert sg.format_record("rte", {**RTE, "label": 1})[1] == 1  # HF numbering


def test_wic_marks_the_word_in_both_sentences():
    (a, b), label = sg.format_record("wic", WIC)
    assert a == "bank: I sat on the river *bank*."
    assert b == "The *bank* raised its rates."
    assert label == 0


def test_wsc_marks_noun_and_pronoun_nested_and_flat():
    (text, question), label = sg.format_record("wsc", WSC)
    assert text == "Mark told *Pete* many lies about himself, which Pete included in #his# book."
    assert question == "Does #his# refer to *Pete*?"
    assert label == 1
    flat = {"text": WSC["text"], **WSC["target"], "label": 0}  # the HF layout
    assert sg.format_record("wsc", flat) == ((text, question), 0)
    multi = {"text": "The big red dog barked at it .", "span1_text": "big red dog", "span1_index": 1,
             "span2_text": "it", "span2_index": 6, "label": 0}
    assert sg.format_record("wsc", multi)[0][0] == "The *big red dog* barked at #it# ."


def test_copa_gives_one_pair_per_choice():
    choices, label = sg.format_record("copa", COPA)
    assert choices == [("The man broke his toe. What was the cause?", COPA["choice1"]),
                       ("The man broke his toe. What was the cause?", COPA["choice2"])]
    assert label == 0
    effect, _ = sg.format_record("copa", {**COPA, "question": "effect", "label": 1})
    assert effect[0][0].endswith("What happened as a result?")


def test_multirc_flat_and_nested():
    assert sg.format_record("multirc", MULTIRC) == (("Tom has two dogs.", "How many dogs? Two"), 1)
    assert sg.multirc_group(MULTIRC) == (0, 0)
    nested = {"idx": 7, "passage": {"text": "P.", "questions": [
        {"question": "Q1?", "idx": 3, "answers": [{"text": "a", "idx": 0, "label": 1}, {"text": "b", "idx": 1, "label": 0}]},
        {"question": "Q2?", "idx": 4, "answers": [{"text": "c", "idx": 2, "label": 0}]},
    ]}}
    flat = sg.prepare("multirc", [nested, MULTIRC])
    assert [(r["question"], r["answer"], r["label"]) for r in flat] == [
        ("Q1?", "a", 1), ("Q1?", "b", 0), ("Q2?", "c", 0), ("How many dogs?", "Two", 1)]
    assert [sg.multirc_group(r, i) for i, r in enumerate(flat)] == [(7, 3), (7, 3), (7, 4), (0, 0)]


@pytest.mark.parametrize("task,record,field", [
    ("boolq", {"question": "q", "label": 1}, "passage"),
    ("rte", {"premise": "p", "hypothesis": "h"}, "label"),
    ("copa", {**COPA, "choice2": None}, "choice2"),
    ("wic", {k: v for k, v in WIC.items() if k != "end2"}, "end2"),
    ("wsc", {"text": "a b", "target": {"span1_text": "a", "span1_index": 0, "span2_text": "b"}, "label": 1}, "span2_index"),
    ("multirc", {k: v for k, v in MULTIRC.items() if k != "answer"}, "answer"),
])
def test_missing_field_names_field_and_index(task, record, field):
    with pytest.raises(SuperGlueFormatError, match=rf"{task} record 5 has no '{field}' field"):
        sg.format_record(task, record, 5)


def test_bad_values_are_clear_errors():
    with pytest.raises(SuperGlueFormatError, match="rte record 2: label 'maybe'"):
        sg.format_record("rte", {**RTE, "label": "maybe"}, 2)
    with pytest.raises(SuperGlueFormatError, match="label -1"):
        sg.format_record("boolq", {**BOOLQ, "label": -1})
    with pytest.raises(SuperGlueFormatError, match="start1/end1"):
        sg.format_record("wic", {**WIC, "end1": 99})
    with pytest.raises(SuperGlueFormatError, match="span2_index=40"):
        sg.format_record("wsc", {**WSC, "target": {**WSC["target"], "span2_index": 40}})
    with pytest.raises(SuperGlueFormatError, match="'start1' must be int"):
        sg.format_record("wic", {**WIC, "start1": "18"})
    with pytest.raises(SuperGlueFormatError, match="'cause' or 'effect'"):
        sg.format_record("copa", {**COPA, "question": "why"})
    with pytest.raises(SuperGlueFormatError, match="'paragraph' field in 'idx'"):
        sg.multirc_group({**MULTIRC, "idx": {"question": 0}}, 3)
    with pytest.raises(SuperGlueFormatError, match="unknown SuperGLUE task 'cb'"):
        sg.format_record("cb", {})


def test_metrics_against_hand_computed_values():
    preds = [1, 0, 1, 1, 0, 0]
    labels = [1, 1, 1, 0, 0, 0]
    assert sg.accuracy(preds, labels) == pytest.approx(4 / 6)
    # tp=2, fp=1, fn=1 -> precision 2/3, recall 2/3 -> F1 2/3
    assert sg.f1a(preds, labels) == pytest.approx(2 / 3)
    assert sg.f1a([0, 0], [1, 0]) == 0.0
    groups = [(0, 0), (0, 0), (0, 1), (0, 1), (1, 0), (1, 0)]
    # question (0,0): one wrong; (0,1): one wrong; (1,0): both right -> EM 1/3
    assert sg.exact_match(preds, labels, groups) == pytest.approx(1 / 3)
    out = sg.metrics("multirc", preds, labels, groups)
    assert out == pytest.approx({"accuracy": 4 / 6, "f1a": 2 / 3, "em": 1 / 3})
    assert set(sg.metrics("boolq", preds, labels)) == {"accuracy"}
    with pytest.raises(ValueError, match="EM needs the"):
        sg.metrics("multirc", preds, labels)


def test_compute_metrics_takes_argmax_of_logits():
    from transformers import EvalPrediction

    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0], [3.0, 0.0]])
    labels = np.array([1, 0, 0, 0])
    out = sg.compute_metrics_fn("multirc", [(0, 0), (0, 0), (1, 0), (1, 0)])(EvalPrediction(logits, labels))
    assert out == pytest.approx({"accuracy": 0.75, "f1a": 2 / 3, "em": 0.5})


def test_tokenize_and_collate_copa_and_classification():
    class Tok:  # whitespace tokenizer with the call signature the code uses
        def __call__(self, a, b, truncation=True, max_length=None):
            def enc(x, y):
                ids = [len(w) for w in (x + " " + y).split()][:max_length]
                return ids, [1] * len(ids)
            if isinstance(a, list):
                pairs = [enc(x, y) for x, y in zip(a, b)]
                return {"input_ids": [p[0] for p in pairs], "attention_mask": [p[1] for p in pairs]}
            ids, mask = enc(a, b)
            return {"input_ids": ids, "attention_mask": mask}

    feats = sg.tokenize("copa", [COPA, {**COPA, "choice1": "Short.", "label": 1}], Tok(), max_length=12)
    assert len(feats[0]["input_ids"]) == 2 and all(len(x) <= 12 for x in feats[0]["input_ids"])
    batch = sg.SuperGlueCollator(pad_token_id=0, multiple_choice=True)(feats)
    width = max(len(s) for f in feats for s in f["input_ids"])
    assert batch["input_ids"].shape == (2, 2, width)
    assert batch["labels"].tolist() == [0, 1]
    short = feats[1]["input_ids"][0]
    assert batch["input_ids"][1, 0, len(short):].eq(0).all() and batch["attention_mask"][1, 0, len(short):].eq(0).all()

    feats = sg.tokenize("boolq", [BOOLQ, {**BOOLQ, "passage": "No.", "label": False}], Tok())
    batch = sg.SuperGlueCollator(pad_token_id=9)(feats)
    assert batch["input_ids"].dtype == torch.long and batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"][1, -1].item() == 9 and batch["attention_mask"][1, -1].item() == 0
