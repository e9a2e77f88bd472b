"""Recipes: validation before loading, typed overrides, and every shipped recipe run end to end for 2
optimizer steps on a tiny config-built model and a small local file in the recipe's data format."""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from badam_hf import recipes as R
from badam_hf.core.hf_features import checkpointing_field
from badam_hf.recipes import RecipeError, load_recipe

SHIPPED = R.shipped_recipes()
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 160,
              "tie_word_embeddings": False}
TINY_ROBERTA = {"model_type": "roberta", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "max_position_embeddings": 72}

WORDS = "the a cat dog sat ran on under mat box red blue big small river bank sky".split()


def _sentence(i, n=6):
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def records_for(fmt, n=8):
    """n small records in the format's own fields (Alpaca, MathInstruct's instruction/output, SuperGLUE)."""
    out = []
    for i in range(n):
        s1, s2 = _sentence(i), _sentence(i + 1)
        lab = i % 2
        if fmt == "alpaca":
            out.append({"instruction": f"Repeat: {s1}", "input": s2 if i % 3 else "", "output": s1 + " " + s2})
        elif fmt == "superglue-boolq":
            out.append({"question": s1, "passage": s2, "label": bool(lab)})
        elif fmt == "superglue-rte":
            out.append({"premise": s1, "hypothesis": s2, "label": ["entailment", "not_entailment"][lab]})
        elif fmt == "superglue-copa":
            out.append({"premise": s1, "choice1": s2, "choice2": _sentence(i + 2), "question": ["cause", "effect"][lab],
                        "label": lab})
        elif fmt == "superglue-wic":
            w = s1.split()[2]
            start = s1.index(" " + w + " ") + 1
            out.append({"word": w, "sentence1": s1, "sentence2": f"{w} {s2}", "start1": start, "end1": start + len(w),
                        "start2": 0, "end2": len(w), "label": bool(lab)})
        elif fmt == "superglue-wsc":
            out.append({"text": s1 + " it", "target": {"span1_text": s1.split()[1], "span1_index": 1,
                                                       "span2_text": "it", "span2_index": 6}, "label": bool(lab)})
        elif fmt == "superglue-multirc":
            out.append({"paragraph": s1, "question": s2 + "?", "answer": _sentence(i + 3, 2),
                        "idx": {"paragraph": i // 4, "question": i // 2, "answer": i}, "label": lab})
        else:
            raise AssertionError(fmt)
    return out


def write_jsonl(path: Path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def tiny_overrides(name, tmp_path):
    """Overrides that make a shipped recipe run in seconds, offline: tiny model, local tokenizer, local data."""
    recipe = load_recipe(name)
    fmt = recipe.data["format"]
    is_lm = fmt == "alpaca"
    if is_lm and "mathinstruct" in name:
        recs = [{"instruction": r["instruction"], "output": r["output"]} for r in records_for("alpaca")]
    else:
        recs = records_for(fmt)
    train = write_jsonl(tmp_path / "train.jsonl", recs)
    ov = [
        "model.from_config=true",
        f"model.config={json.dumps(TINY_LLAMA if is_lm else TINY_ROBERTA)}",
        "model.tokenizer=local",
        "model.tokenizer_vocab_size=300",
        "model.attn_implementation=null",
        f"data.dataset={train}",
        "data.hub_config=null",
        f"data.cutoff_len={160 if is_lm else 64}",
        f"training.output_dir={tmp_path / 'out'}",
        "training.max_steps=2",
        "training.use_cpu=true",
        "training.report_to=none",
        "training.logging_steps=1",
        "training.disable_tqdm=true",
        "training.dataloader_num_workers=0",
        "badam.switch_every=1",
    ]
    if is_lm:
        # the local tokenizer has no chat template (the smollm2 recipe's chat template is run on the real model in
        # tests/test_pretrained.py)
        ov += ["training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=2", "data.template=alpaca"]
    else:
        val = write_jsonl(tmp_path / "val.jsonl", records_for(fmt, 6))
        ov += [f"data.eval_dataset={val}", "training.per_device_train_batch_size=4",
               "training.per_device_eval_batch_size=4"]
    return ov


def replacing(overrides, extra):
    """`overrides` with `extra` added; an `extra` key replaces the same key in `overrides` (a key given twice
    on the command line is refused)."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [o for o in overrides if o.split("=", 1)[0] not in keys] + list(extra)


def test_every_shipped_recipe_is_listed_and_validates():
    expected = {"demo", "llama2-7b-alpaca-gpt4", "llama3-8b-alpaca-gpt4", "llama3-8b-mathinstruct",
                "llama3-70b-mathinstruct", "smollm2-135m-alpaca"} | {f"roberta-large-superglue-{t}" for t in
                                              ("boolq", "copa", "wsc", "rte", "multirc", "wic")}
    assert set(SHIPPED) == expected
    for name, path in SHIPPED.items():
        r = load_recipe(name)
        assert R.describe(path), name
        text = path.read_text()
        if name == "llama3-70b-mathinstruct":  # needs the FSDP2 launch
            assert f"--config_file configs/accelerate_fsdp2.yaml -m badam_hf train {name}" in text
        else:
            assert f"badam-hf train {name}" in text, name
        assert r.training["output_dir"]


def test_shipped_hyperparameters_follow_the_paper():
    l2 = load_recipe("llama2-7b-alpaca-gpt4")
    assert (l2.training["learning_rate"], l2.training["lr_scheduler_type"], l2.training["weight_decay"]) == (1e-5, "cosine", 0.01)
    assert (l2.training["per_device_train_batch_size"], l2.training["gradient_accumulation_steps"]) == (2, 8)
    assert l2.training["bf16"] and l2.training[checkpointing_field()] and l2.training["num_train_epochs"] == 3
    assert (l2.badam.schedule.switch_every, l2.badam.schedule.switch_mode) == (100, "random")
    assert load_recipe("llama3-8b-alpaca-gpt4").training["learning_rate"] == 1e-6
    assert load_recipe("llama3-8b-mathinstruct").data["dataset"] == "TIGER-Lab/MathInstruct"
    big = load_recipe("llama3-70b-mathinstruct")
    assert (big.training["per_device_train_batch_size"], big.training["gradient_accumulation_steps"]) == (8, 2)
    assert big.model["dtype"] == "bfloat16" and big.training["bf16"] is False  # FSDP2: no partial upcast
    for t in ("boolq", "copa", "wsc", "rte", "multirc", "wic"):
        r = load_recipe(f"roberta-large-superglue-{t}")
        assert r.training["learning_rate"] == 1e-5 and r.training["lr_scheduler_type"] == "linear"
        assert r.training["warmup_steps"] == 0.1 and r.training["per_device_train_batch_size"] == 16
        assert r.training["num_train_epochs"] == 32 and not r.training["bf16"] and r.model["dtype"] == "float32"
        assert r.data["cutoff_len"] == 256 and r.badam.schedule.switch_mode == "ascending"
        assert r.badam.partition.always_active == ["classifier"]
        assert r.task == ("multiple-choice" if t == "copa" else "sequence-classification")
    assert load_recipe("roberta-large-superglue-multirc").training["metric_for_best_model"] == "f1a"


@pytest.mark.integration  # a Trainer run per shipped recipe (13)
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_recipe_runs_two_steps(name, tmp_path, capsys):
    torch.manual_seed(0)
    recipe = load_recipe(name, tiny_overrides(name, tmp_path))
    summary = R.run(recipe)
    assert summary["steps"] == 2
    assert summary["train_loss"] > 0.1  # real targets were trained on (not an all -100 batch)
    # switch_every=1: each of the two steps trained its own block
    assert len(summary["blocks_visited"]) == 2
    assert (tmp_path / "out" / "config.json").exists() and summary["output_dir"] == str((tmp_path / "out").resolve())
    if recipe.data["format"].startswith("superglue-"):
        expected = {"eval_accuracy", "eval_f1a", "eval_em"} if name.endswith("multirc") else {"eval_accuracy"}
        assert expected <= set(summary["eval_metrics"]), summary["eval_metrics"]
        assert 0.0 <= summary["eval_metrics"]["eval_accuracy"] <= 1.0
    out = capsys.readouterr().out
    assert "steps:          2" in out and "model saved to:" in out and "peak memory:" in out


def test_alpaca_labels_mask_the_prompt_and_only_visited_blocks_change(tmp_path):
    torch.manual_seed(0)
    recipe = load_recipe("llama3-8b-alpaca-gpt4", replacing(tiny_overrides("llama3-8b-alpaca-gpt4", tmp_path),
                         ["badam.switch_mode=ascending", "model.dtype=float32", "training.bf16=false"]))
    built = R.build(recipe)
    tok = built.tokenizer
    ex = built.trainer.train_dataset[0]
    prompt_len = ex["labels"].index(next(x for x in ex["labels"] if x != -100))
    assert prompt_len > 5 and ex["input_ids"][0] == tok.bos_token_id
    assert ex["labels"][prompt_len:] == ex["input_ids"][prompt_len:] and ex["labels"][-1] == tok.eos_token_id
    assert "### Response:" in tok.decode(ex["input_ids"][:prompt_len])
    model = built.trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    built.trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all(n.startswith(("model.layers.0.", "model.layers.1.")) for n in changed)
    assert any(n.startswith("model.layers.0.") for n in changed) and any(n.startswith("model.layers.1.") for n in changed)


def test_classification_head_always_active(tmp_path):
    torch.manual_seed(0)
    name = "roberta-large-superglue-rte"
    recipe = load_recipe(name, replacing(tiny_overrides(name, tmp_path), ["training.eval_strategy=no",
                                                                 "training.load_best_model_at_end=false",
                                                                 "training.warmup_steps=0",
                                                                 "training.max_steps=1"]))
    built = R.build(recipe)
    model = built.trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    built.trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    # ascending, first block = encoder layer 0, plus the always-active classifier
    assert any(n.startswith("classifier.") for n in changed)
    assert all(n.startswith(("classifier.", "roberta.encoder.layer.0.")) for n in changed), changed
    assert not any(n.startswith("roberta.encoder.layer.1.") for n in changed)


# --- validation ---


def _write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = """
model: {name_or_path: nowhere/never-downloaded}
data: {dataset: missing.jsonl, format: alpaca}
badam: {switch_every: 10}
training: {output_dir: out, learning_rate: 1.0e-5}
"""


def test_valid_minimal_recipe_and_typed_overrides(tmp_path):
    p = _write(tmp_path, BASE)
    r = load_recipe(p, ["training.learning_rate=2e-5", "badam.always_active=[classifier, pooler]",
                        "data.max_samples=100", "training.bf16=true", "data.val_size=0.1",
                        "training.eval_strategy=steps"])
    assert r.training["learning_rate"] == 2e-5 and isinstance(r.training["learning_rate"], float)
    assert r.badam.partition.always_active == ["classifier", "pooler"]
    assert r.data["max_samples"] == 100 and r.training["bf16"] is True
    assert r.data["cutoff_len"] == 512 and r.model["dtype"] == "bfloat16"  # defaults
    assert r.badam.schedule.switch_every == 10
    assert r.task == "causal-lm"


@pytest.mark.parametrize("overrides,pattern", [
    (["optimizer.lr=1"], r"unknown section\(s\) 'optimizer'"),
    (["model.nmae=x"], r"unknown key\(s\) 'nmae' in section 'model'"),
    (["data.formatt=alpaca"], r"unknown key\(s\) 'formatt' in section 'data'"),
    (["training.learnig_rate=1e-5"], r"'learnig_rate' \(did you mean 'learning_rate'\?\)"),
    (["badam.switch_evry=3"], r"unknown key\(s\) 'switch_evry'"),
    (["training.num_train_epochs=three"], r"training.num_train_epochs='three' has the wrong type; expected a number"),
    (["training.bf16=yes please"], r"training.bf16='yes please' has the wrong type; expected true/false"),
    (["data.cutoff_len=long"], r"data.cutoff_len='long' has the wrong type; expected an integer"),
    (["model.dtype=int8"], r"model.dtype='int8' is not valid; choose one of bfloat16"),
    (["data.format=superglue-cb"], r"data.format='superglue-cb' is not valid"),
    (["data.format=null"], r"data.format is required"),
    (["model.name_or_path=null"], r"model.name_or_path is required"),
    (["training.output_dir=null"], r"training.output_dir is required"),
    (["badam.switch_mode=sideways"], r"switch_mode='sideways' is not valid"),
    (["badam.switch_every=0"], r"badam.switch_every=0 is not valid"),
    (["training.eval_strategy=epoch"], r"no evaluation data; set data.val_size"),
    (["training.optim=adamw_torch"], r"always trains with BAdam"),
    (["data.val_size=1.5"], r"data.val_size=1.5 must be a fraction"),
])
def test_bad_recipes_name_key_and_file(tmp_path, overrides, pattern):
    p = _write(tmp_path, BASE)
    with pytest.raises(RecipeError, match=pattern) as err:
        load_recipe(p, overrides)
    assert str(p) in str(err.value)


@pytest.mark.parametrize("name", ["gradient_checkpointing", "activation_checkpointing"])
def test_either_checkpointing_name_turns_it_on_under_the_installed_name(tmp_path, name):
    # transformers 5.18 knows only gradient_checkpointing; newer releases prefer activation_checkpointing and
    # warn that the old name goes away. A recipe may use either: it reaches TrainingArguments under the name
    # the installed release prefers, with its _kwargs twin.
    p = _write(tmp_path, BASE)
    r = load_recipe(p, [f"training.{name}=true", f"training.{name}_kwargs={{use_reentrant: false}}"])
    field = checkpointing_field()
    other = ({"gradient_checkpointing", "activation_checkpointing"} - {field}).pop()
    assert r.training[field] is True and r.training[field + "_kwargs"] == {"use_reentrant": False}
    assert other not in r.training and other + "_kwargs" not in r.training
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated name reaches TrainingArguments
        args = TrainingArguments(**{**r.training, "use_cpu": True})
    assert getattr(args, field) is True


def test_two_names_of_the_checkpointing_setting_must_agree(tmp_path):
    p = _write(tmp_path, BASE)
    with pytest.raises(RecipeError, match=r"contradicts another name of the same setting"):
        load_recipe(p, ["training.gradient_checkpointing=true", "training.activation_checkpointing=false"])
    r = load_recipe(p, ["training.gradient_checkpointing=true", "training.activation_checkpointing=true"])
    assert r.training[checkpointing_field()] is True


def test_training_arguments_rules_fail_before_any_data_is_read(tmp_path):
    # missing.jsonl does not exist: reaching the data would give "no such file" instead
    p = _write(tmp_path, BASE)
    recipe = load_recipe(p, ["data.val_size=0.2", "training.eval_strategy=steps", "training.save_strategy=epoch",
                             "training.load_best_model_at_end=true", "training.use_cpu=true"])
    with pytest.raises(RecipeError, match=r"r.yaml: section 'training' is not usable here: .*load_best_model_at_end"):
        R.build(recipe)


def test_scientific_literals_and_yaml_no(tmp_path):
    p = _write(tmp_path, BASE.replace("learning_rate: 1.0e-5", "learning_rate: 3e-4, save_strategy: no")
               + "  # trailing comment\n")
    r = load_recipe(p, ["model.from_config=true", "model.config={model_type: llama, rope_theta: 5e5}"])
    assert r.training["learning_rate"] == 3e-4 and r.training["save_strategy"] == "no"
    assert r.model["config"]["rope_theta"] == 5e5


def test_missing_section_key_and_bad_yaml(tmp_path):
    p = _write(tmp_path, "model: {name_or_path: x}\ntraining: {output_dir: o}\n")
    with pytest.raises(RecipeError, match=r"r.yaml: data.dataset is required"):
        load_recipe(p)
    p = _write(tmp_path, "model: [1, 2]\n", "list.yaml")
    with pytest.raises(RecipeError, match=r"list.yaml: section 'model' must be a mapping"):
        load_recipe(p)
    p = _write(tmp_path, "model: {a: [}\n", "bad.yaml")
    with pytest.raises(RecipeError, match="bad.yaml is not valid YAML"):
        load_recipe(p)
    with pytest.raises(RecipeError, match=r"override 'training' on the command line is not section.key=value"):
        load_recipe(_write(tmp_path, BASE), ["training"])
    with pytest.raises(RecipeError, match="must be dotted"):
        load_recipe(_write(tmp_path, BASE), ["training=1"])


def test_unknown_recipe_lists_shipped_names():
    with pytest.raises(RecipeError, match=r"no shipped recipe of that name; shipped recipes: demo, llama2-7b-alpaca-gpt4"):
        load_recipe("llama9-alpaca")
    assert R.resolve("demo.yaml") == SHIPPED["demo"]


def test_describe_prefers_description_key(tmp_path):
    p = _write(tmp_path, "# Header line.\n# more\n" + BASE)
    assert R.describe(p) == "Header line."
    p = _write(tmp_path, "# Header line.\ndescription: From the key.\n" + BASE, "d.yaml")
    assert R.describe(p) == "From the key."
    assert load_recipe(p).description == "From the key."


def test_data_errors_name_the_field_and_record(tmp_path):
    recs = records_for("superglue-boolq")
    del recs[3]["passage"]
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    name = "roberta-large-superglue-boolq"
    ov = replacing(tiny_overrides(name, tmp_path), [f"data.dataset={data}"])
    with pytest.raises(RecipeError, match=r"boolq record 3 has no 'passage' field"):
        R.build(load_recipe(name, ov))
    alp = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "z"}])
    ov = replacing(tiny_overrides("demo", tmp_path), [f"data.dataset={alp}"])
    with pytest.raises(RecipeError, match=r"record 1 has no 'output' field"):
        R.build(load_recipe("demo", ov))
    ov = replacing(tiny_overrides("demo", tmp_path), [f"data.dataset={tmp_path / 'nope.jsonl'}"])
    with pytest.raises(RecipeError, match=r"data.dataset=.*nope.jsonl.*no such file"):
        R.build(load_recipe("demo", ov))


def test_validation_collects_every_problem(tmp_path):
    p = _write(tmp_path, BASE)
    overrides = ["extra.key=1", "model.nmae=x", "model.dtype=int8", "data.cutoff_len=long", "data.val_size=1.5",
                 "badam.switch_every=0", "badam.switch_mode=sideways", "badam.switch_evry=3",
                 "training.learnig_rate=1e-5", "training.bf16=maybe", "training.eval_strategy=steps"]
    with pytest.raises(RecipeError) as err:
        load_recipe(p, overrides)
    problems = err.value.problems
    assert str(err.value).splitlines() == problems and all(x.startswith(f"{p}: ") for x in problems)
    expected = [r"unknown section\(s\) 'extra'", r"unknown key\(s\) 'nmae' in section 'model'",
                r"model.dtype='int8' is not valid", r"data.cutoff_len='long' has the wrong type",
                r"data.val_size=1.5 must be a fraction", r"unknown key\(s\) 'switch_evry'",
                r"badam.switch_every=0 is not valid", r"switch_mode='sideways' is not valid",
                r"'learnig_rate' \(did you mean 'learning_rate'\?\)", r"training.bf16='maybe' has the wrong type"]
    assert len(problems) == len(expected), "\n".join(problems)
    for pattern, problem in zip(expected, problems):
        assert re.search(pattern, problem), (pattern, problem)
    # A rule between keys stays quiet when one of its keys is already reported: no "no evaluation data" for the
    # bad val_size. Without that key's own problem, the rule speaks.
    with pytest.raises(RecipeError, match="no evaluation data") as err:
        load_recipe(p, ["training.eval_strategy=steps", "badam.switch_every=0"])
    assert len(err.value.problems) == 2


def test_bad_overrides_are_reported_together(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, BASE), ["training", "training.max_steps=3", "badam=1", "model.name_or_path.x=1"])
    problems = err.value.problems
    assert len(problems) == 3, problems
    assert "override 'training' on the command line is not section.key=value" in problems[0]
    assert "override 'badam=1'" in problems[1] and "must be dotted" in problems[1]
    assert "override 'model.name_or_path.x=1': model.name_or_path is not a section" in problems[2]
