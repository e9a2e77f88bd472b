"""`training_args.bin` of a `--optim badam` run loads in a process that never imported badam_hf (hub upload
tools, model-card generators and HF's examples do `torch.load(path, weights_only=False)`), while training,
resuming with the Trainer and `--optim badam` parsing keep the enum member."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys

import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

import badam_hf  # noqa: F401  (registers --optim badam)

VOCAB = 64

# Run in a fresh interpreter: load the file with plain torch, then prove badam_hf was never imported.
LOADER = """
import sys, torch
args = torch.load(sys.argv[1], weights_only=False)
assert not any(m == "badam_hf" or m.startswith("badam_hf.") for m in sys.modules), "badam_hf was imported"
print(type(args).__name__, type(args.optim).__name__, args.optim, args.optim_args)
"""


def _load_elsewhere(path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the checkout on the path
    proc = subprocess.run([sys.executable, "-c", LOADER, str(path)], capture_output=True, text=True, env=env,
                          cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def _data(n: int = 8, seq: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, seq), generator=g)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def _trainer(tiny_llama, out, max_steps: int) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out), optim="badam", optim_args="switch_every=2,switch_mode=ascending", max_steps=max_steps,
        per_device_train_batch_size=2, learning_rate=1e-2, save_strategy="steps", save_steps=2, report_to="none",
        use_cpu=True, disable_tqdm=True, seed=0,
    )
    return Trainer(model=tiny_llama(seed=0), args=args, train_dataset=_data())


def test_member_pickles_as_plain_string_and_copies_as_member():
    member = OptimizerNames("badam")
    assert member is OptimizerNames.BADAM
    loaded = pickle.loads(pickle.dumps(member))
    assert type(loaded) is str and loaded == "badam"
    assert copy.deepcopy(member) is member and copy.copy(member) is member
    # Other members are untouched.
    assert pickle.loads(pickle.dumps(OptimizerNames.ADAMW_TORCH)) is OptimizerNames.ADAMW_TORCH


def test_parsed_args_keep_the_member_and_pickle_as_string(tmp_path):
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "badam", "--optim_args", "switch_every=5", "--report_to", "none"]
    )
    assert args.optim is OptimizerNames.BADAM
    path = tmp_path / "training_args.bin"
    torch.save(args, path)
    assert _load_elsewhere(path) == "TrainingArguments str badam switch_every=5"
    # With badam_hf imported, a loaded copy still builds a BAdam run: "badam" equals the member.
    again = torch.load(path, weights_only=False)
    assert again.optim == OptimizerNames.BADAM
    assert TrainingArguments(**{**again.to_dict(), "output_dir": str(tmp_path)}).optim is OptimizerNames.BADAM


def test_trainer_checkpoint_loads_without_badam_hf_and_resumes(tmp_path, tiny_llama):
    full = _trainer(tiny_llama, tmp_path / "full", max_steps=4)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert _load_elsewhere(ckpt / "training_args.bin") == "TrainingArguments str badam switch_every=2,switch_mode=ascending"

    resumed = _trainer(tiny_llama, tmp_path / "resumed", max_steps=4)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 4
    ref = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, ref[name]), name
