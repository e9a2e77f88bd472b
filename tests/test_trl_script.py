"""TRL's own `trl/scripts/sft.py`, unchanged, trains with `--optim badam` through `python -m badam_hf.run`.

Everything is local: a tiny Llama and a word-level tokenizer with a chat template saved to one folder, and
a `messages` jsonl; the subprocess runs with the Hub switched off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trl  # a hard dependency of this test: trl is in the test extra
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

pytestmark = pytest.mark.integration

VOCAB = 64  # the tiny models' vocabulary (tests/tiny_models.py)
SFT_SCRIPT = Path(trl.__file__).parent / "scripts" / "sft.py"
SPECIALS = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
WORDS = "zero one two three four five six seven eight nine repeat reverse please".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    assert len(vocab) <= VOCAB  # the tiny model's embedding must cover every id
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", chat_template=CHAT_TEMPLATE
    )


def _messages(n: int = 24) -> list[dict]:
    rows = []
    for i in range(n):
        digits = [WORDS[(i * 7 + k * 3) % 10] for k in range(3 + i % 3)]
        op = "repeat" if i % 2 else "reverse"
        answer = digits if op == "repeat" else digits[::-1]
        rows.append({"messages": [
            {"role": "user", "content": " ".join(["please", op, *digits])},
            {"role": "assistant", "content": " ".join(answer)},
        ]})
    return rows


def _run(args, cache):
    # Offline, with a private datasets cache so the jsonl's Arrow copy lands in tmp_path.
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(cache))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


def test_trl_sft_script_trains_only_the_scheduled_blocks(tmp_path, tiny_llama):
    model_dir, data_dir, out = tmp_path / "model", tmp_path / "data", tmp_path / "out"
    tiny_llama().save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    init = load_file(model_dir / "model.safetensors")
    data_dir.mkdir()
    # A folder with train.jsonl: `load_dataset(folder)` gives a "train" split, which sft.py trains on.
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _messages()))

    proc = _run([
        "-m", "badam_hf.run", str(SFT_SCRIPT),
        "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir), "--output_dir", str(out),
        "--optim", "badam", "--optim_args", "switch_every=2,switch_mode=ascending",
        "--max_steps", "6", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--max_length", "32",
        # TRL's other defaults stay (gradient checkpointing on); its default bf16=True is turned off on CPU.
        "--use_cpu", "True", "--bf16", "False", "--logging_steps", "1", "--report_to", "none",
        "--disable_tqdm", "True", "--dataloader_num_workers", "0",
        # One checkpoint at the last step: its trainer_state.json carries the per-step log history.
        "--save_strategy", "steps", "--save_steps", "6",
    ], cache=tmp_path / "hf_datasets")
    assert proc.returncode == 0, proc.stderr[-3000:]

    history = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "loss" in h]
    assert [h["badam/active_block"] for h in steps] == [0, 0, 1, 1, 2, 2]
    assert steps[0]["badam/active_block_name"] == "model.layers.0"

    # sft.py saves the final model to output_dir: layers 0-2 moved, everything else is bit-identical.
    final = load_file(out / "model.safetensors")
    assert set(final) == set(init)
    changed = {n for n in init if not torch.equal(init[n], final[n])}
    trained = {n for n in init if n.startswith(("model.layers.0.", "model.layers.1.", "model.layers.2."))}
    assert changed == trained
