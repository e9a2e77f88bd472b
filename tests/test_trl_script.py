"""TRL's own scripts (`trl/scripts/sft.py`, `reward.py`, `kto.py`, `grpo.py`, `rloo.py`), unchanged, train with
`--optim badam` through `python -m badam_hf.run`; only the scheduled blocks (and a reward model's new head) move.

Everything is local (tests/trl_local.py): a tiny Llama and a word-level tokenizer with a chat template saved to
one folder, jsonl data in another; the subprocess runs with the Hub switched off.
"""

from __future__ import annotations

import pytest
from safetensors.torch import load_file
from trl_local import changed, run_script, save_model, step_logs, task, under, write_jsonl

pytestmark = pytest.mark.integration


def _messages(n: int = 24) -> list[dict]:
    rows = []
    for i in range(n):
        request, answer = task(i)
        rows.append({"messages": [
            {"role": "user", "content": request},
            {"role": "assistant", "content": " ".join(answer)},
        ]})
    return rows


def test_trl_sft_script_trains_only_the_scheduled_blocks(tmp_path, tiny_llama):
    model_dir, out = tmp_path / "model", tmp_path / "out"
    init = save_model(tiny_llama(), model_dir)
    data_dir = write_jsonl(tmp_path / "data", _messages())

    run_script("sft", [
        "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir), "--output_dir", str(out),
        "--optim", "badam", "--optim_args", "switch_every=2,switch_mode=ascending",
        "--max_steps", "6", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--max_length", "32",
        # One checkpoint at the last step: its trainer_state.json carries the per-step log history.
        "--save_strategy", "steps", "--save_steps", "6",
    ], tmp_path)

    steps = step_logs(out / "checkpoint-6")
    assert [h["badam/active_block"] for h in steps] == [0, 0, 1, 1, 2, 2]
    assert steps[0]["badam/active_block_name"] == "model.layers.0"

    # sft.py saves the final model to output_dir: layers 0-2 moved, everything else is bit-identical.
    final = load_file(out / "model.safetensors")
    assert changed(init, final) == under(init, "model.layers.0", "model.layers.1", "model.layers.2")


def _preferences(n: int = 16) -> list[dict]:
    """Explicit-prompt preference pairs: the right answer is chosen, the answer backwards is rejected."""
    rows = []
    for i in range(n):
        request, answer = task(i)
        rows.append({"prompt": request, "chosen": " ".join(answer), "rejected": " ".join(answer[::-1] + ["zero"])})
    return rows


def test_trl_reward_script_trains_the_blocks_and_the_new_score_head(tmp_path, tiny_llama):
    # reward.py loads the causal-LM checkpoint as AutoModelForSequenceClassification(num_labels=1): its `score`
    # head is new (random), and BAdam trains it in every block (a task head is always active).
    model_dir, out = tmp_path / "model", tmp_path / "out"
    init = save_model(tiny_llama(), model_dir)
    data_dir = write_jsonl(tmp_path / "data", _preferences())

    run_script("reward", [
        "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir), "--output_dir", str(out),
        "--optim", "badam", "--optim_args", "switch_every=2,switch_mode=ascending",
        "--max_steps", "4", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--max_length", "32",
        "--save_strategy", "steps", "--save_steps", "1",  # a checkpoint after every step
    ], tmp_path)

    steps = step_logs(out / "checkpoint-4")
    assert [h["badam/active_block"] for h in steps] == [0, 0, 1, 1]

    final = load_file(out / "model.safetensors")
    # The LM head is gone (a sequence-classification model has none); the score head is new.
    assert set(final) - set(init) == {"score.weight"}
    assert set(init) - set(final) == {"lm_head.weight"}
    del init["lm_head.weight"]
    init["score.weight"] = _initial_score_head(model_dir)
    # Step by step: the active layer and the score head move in each step, nothing else does.
    before = init
    for step, layer in zip(range(1, 5), [0, 0, 1, 1], strict=True):
        after = load_file(out / f"checkpoint-{step}" / "model.safetensors")
        assert changed(before, after) == under(init, f"model.layers.{layer}") | {"score.weight"}, step
        before = after
    assert changed(before, final) == set()


def _initial_score_head(model_dir):
    """The random `score` head reward.py starts from: RewardTrainer seeds (args.seed, 42 by default) right
    before it loads the checkpoint as a sequence classifier."""
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(42)
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).score.weight.detach()
