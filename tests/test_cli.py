"""`badam-hf recipes` and `badam-hf train`: listing, clear exit-2 errors, a real tiny run; estimate still works."""

import json

import pytest
import torch

from badam_hf.tools.cli import main
from badam_hf.recipes import shipped_recipes

TINY = """# A tiny offline recipe written by the test.
model:
  from_config: true
  config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 3,
           num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 160}
  tokenizer: local
  tokenizer_vocab_size: 300
  dtype: float32
data:
  dataset: DATA
  format: alpaca
  cutoff_len: 160
  val_size: 0.25
badam:
  switch_every: 1
  switch_mode: descending
training:
  output_dir: OUT
  max_steps: 2
  per_device_train_batch_size: 2
  learning_rate: 1.0e-3
  eval_strategy: steps
  eval_steps: 2
  save_strategy: no
  use_cpu: true
  report_to: none
  disable_tqdm: true
"""


def _tiny(tmp_path, records=None):
    if records is None:
        records = [{"instruction": f"Say {w} twice.", "input": "", "output": f"{w} {w}"}
                   for w in "red green blue cat dog sun moon star".split()]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY.replace("DATA", str(data)).replace("OUT", str(tmp_path / "out")))
    return p


def test_recipes_lists_every_shipped_recipe_with_its_description(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(shipped_recipes())
    line = next(line for line in out if line.startswith("llama3-8b-alpaca-gpt4 "))
    assert "Llama 3-8B: full-parameter instruction tuning on Alpaca-GPT4" in line


def test_train_runs_a_recipe_file_and_prints_the_summary(tmp_path, capsys):
    torch.manual_seed(0)
    p = _tiny(tmp_path)
    assert main(["train", str(p), "training.learning_rate=2e-3"]) == 0
    out = capsys.readouterr().out
    assert "steps:          2" in out
    # descending, switch_every=1: the last two of the three layers trained
    assert "blocks visited: 2 of 3 (model.layers.1, model.layers.2)" in out
    assert "peak memory:" in out and "eval:           eval_loss=" in out
    assert f"model saved to: {(tmp_path / 'out').resolve()}" in out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 3
    assert len(AutoTokenizer.from_pretrained(tmp_path / "out")) == model.config.vocab_size


def test_check_validates_without_training(tmp_path, capsys):
    assert main(["train", "demo", "--check"]) == 0
    assert "valid" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,pattern", [
    (["no-such-recipe"], "no shipped recipe of that name; shipped recipes: demo, llama2-7b-alpaca-gpt4"),
    (["llama3-8b-alpaca-gpt4", "training.lr=1e-5"], "unknown key(s) in section 'training': 'lr'"),
    (["llama3-8b-alpaca-gpt4", "badam.switch_every=often"], "switch_every='often' in section 'badam'"),
    (["llama3-8b-alpaca-gpt4", "training.per_device_train_batch_size=2.5"],
     "training.per_device_train_batch_size=2.5 has the wrong type; expected an integer"),
    (["llama3-8b-alpaca-gpt4", "data.dataset=null"], "llama3-8b-alpaca-gpt4.yaml: data.dataset is required"),
    (["llama3-8b-alpaca-gpt4", "modle.dtype=float32"], "unknown section(s) 'modle'"),
])
def test_bad_inputs_exit_2_with_a_clear_error(args, pattern, capsys):
    # Validation comes first: the shipped Llama recipe would otherwise try to download a model.
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("badam-hf train: ") and pattern in err


def test_bad_data_exits_2_naming_field_and_record(tmp_path, capsys):
    p = _tiny(tmp_path, [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"},
                         {"instruction": "e", "outptu": "f"}])
    assert main(["train", str(p)]) == 2
    assert "record 2 has no 'output' field" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_estimate_still_works(capsys):
    assert main(["estimate", "llama3-8b"]) == 0
    assert "| BAdam |" in capsys.readouterr().out


@pytest.mark.parametrize("flag,value", [("--gpus", "0"), ("--batch", "0"), ("--seq", "-5"), ("--lora-rank", "0")])
def test_estimate_refuses_sizes_below_one(capsys, flag, value):
    assert main(["estimate", "llama3-8b", flag, value]) == 2
    out = capsys.readouterr()
    name = flag.lstrip("-").replace("-", "_")
    assert f"{name}={value}: {name} must be a whole number >= 1" in out.err
    assert out.out == ""  # no table


def test_chat_template_without_one_in_the_tokenizer_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "demo", "data.template=chat", "training.max_steps=1", f"training.output_dir={tmp_path}/out"])
    assert code == 2
    assert "needs a tokenizer with a chat template" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("check", [["--check"], []])
def test_every_problem_of_a_recipe_is_reported_in_one_run(tmp_path, capsys, check):
    # Three independent mistakes, in three sections: all are reported at once, and nothing trains.
    p = _tiny(tmp_path)
    text = p.read_text()
    text = text.replace("dtype: float32", "dtype: int8").replace("switch_mode: descending", "switch_mode: sideways")
    p.write_text(text.replace("  learning_rate: 1.0e-3", "  learnig_rate: 1.0e-3"))
    assert main(["train", str(p), *check]) == 2
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert len(lines) == 3 and all(line.startswith(f"badam-hf train: {p}: ") for line in lines), out.err
    assert "model.dtype='int8' is not valid; choose one of bfloat16" in lines[0]
    assert "badam.switch_mode='sideways' is not valid" in lines[1]
    assert "unknown key(s) in section 'training': 'learnig_rate' (did you mean 'learning_rate'?)" in lines[2]
    assert "valid (" not in out.out and "steps:" not in out.out
    assert not (tmp_path / "out").exists()
