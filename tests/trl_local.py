"""Shared by the tests that run TRL's own scripts (`trl/scripts/*.py`, unchanged) with `--optim badam`.

Everything is local: a tiny Llama and a word-level tokenizer with a chat template saved to one folder, jsonl
data in another, and the subprocess runs with the Hub switched off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import trl  # a hard dependency of these tests: trl is in the test extra
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

VOCAB = 64  # the tiny models' vocabulary (tests/tiny_models.py)
SCRIPTS = Path(trl.__file__).parent / "scripts"
SPECIALS = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
WORDS = "zero one two three four five six seven eight nine repeat reverse please".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Arguments every script run takes: TRL's other defaults stay (gradient checkpointing on); its default bf16=True
# is turned off on CPU.
COMMON_ARGS = [
    "--use_cpu", "True", "--bf16", "False", "--logging_steps", "1", "--report_to", "none",
    "--disable_tqdm", "True", "--dataloader_num_workers", "0",
]


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    assert len(vocab) <= VOCAB  # the tiny model's embedding must cover every id
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", chat_template=CHAT_TEMPLATE
    )


def task(i: int) -> tuple[str, list[str]]:
    """The i-th toy task: a request ("please reverse three one ...") and the words of its answer."""
    digits = [WORDS[(i * 7 + k * 3) % 10] for k in range(3 + i % 3)]
    op = "repeat" if i % 2 else "reverse"
    return " ".join(["please", op, *digits]), (digits if op == "repeat" else digits[::-1])


def save_model(model, folder: Path) -> dict[str, torch.Tensor]:
    """Save `model` and the tokenizer to `folder` (a checkpoint TRL loads by path); return its weights."""
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return load_file(folder / "model.safetensors")


def write_jsonl(folder: Path, rows: list[dict]) -> Path:
    """A folder with train.jsonl: `load_dataset(folder)` gives a "train" split, which the scripts train on."""
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def run_script(name: str, args: list[str], tmp_path: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m badam_hf.run trl/scripts/<name>.py ARGS`, offline, with a private datasets cache so the jsonl's
    Arrow copy lands in tmp_path. Fails the test with the end of stderr when the script fails."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"))
    proc = subprocess.run([sys.executable, "-m", "badam_hf.run", str(SCRIPTS / f"{name}.py"), *args, *COMMON_ARGS],
                          capture_output=True, text=True, env=env, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def step_logs(checkpoint: Path) -> list[dict]:
    """The per-step training logs of a checkpoint's trainer_state.json."""
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "loss" in h]


def changed(init: dict[str, torch.Tensor], final: dict[str, torch.Tensor]) -> set[str]:
    """Names of the tensors that differ (the two must hold the same names)."""
    assert set(final) == set(init)
    return {n for n in init if not torch.equal(init[n], final[n])}


def under(names, *prefixes: str) -> set[str]:
    """The names under any of the module paths `prefixes`."""
    return {n for n in names if n.startswith(tuple(p + "." for p in prefixes))}
