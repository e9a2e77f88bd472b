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


def run_badam(script: str, model_dir, data_dir, out, args: list[str], tmp_path, cwd=None):
    """`run_script` of TRL's `script` on the saved model and jsonl data, into `out`, with `--optim badam` (K=2,
    ascending) and the script's own further `args`."""
    return run_script(script, [
        "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir), "--output_dir", str(out),
        "--optim", "badam", "--optim_args", "switch_every=2,switch_mode=ascending", *args,
    ], tmp_path, cwd=cwd)


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

    run_badam("sft", model_dir, data_dir, out, [
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

    run_badam("reward", model_dir, data_dir, out, [
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


def test_trl_kto_script_trains_only_the_scheduled_blocks(tmp_path, tiny_llama):
    # KTO: unpaired completions labelled desirable or not, against a reference copy of the model (never trained).
    model_dir, out = tmp_path / "model", tmp_path / "out"
    init = save_model(tiny_llama(), model_dir)
    rows = []
    for i in range(8):
        request, answer = task(i)
        rows.append({"prompt": request, "completion": " ".join(answer), "label": True})
        rows.append({"prompt": request, "completion": " ".join(answer[::-1] + ["zero"]), "label": False})
    data_dir = write_jsonl(tmp_path / "data", rows)

    run_badam("kto", model_dir, data_dir, out, [
        "--max_steps", "4", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--max_length", "32",
        "--save_strategy", "steps", "--save_steps", "4",
    ], tmp_path)

    assert [h["badam/active_block"] for h in step_logs(out / "checkpoint-4")] == [0, 0, 1, 1]
    final = load_file(out / "model.safetensors")
    assert changed(init, final) == under(init, "model.layers.0", "model.layers.1")


# A reward for GRPO / RLOO given to the scripts by import path (they put the working directory on sys.path). It
# records the optimizer step at which each generated batch is scored, and scores a completion by the sum of its
# token ids: any function of the completion whose values differ within a group gives nonzero advantages.
TOY_REWARDS = '''
def toy_reward(completions, completion_ids, trainer_state, **kwargs):
    with open("generations.txt", "a") as f:
        f.write(f"{trainer_state.global_step}\\n")
    return [float(sum(ids)) for ids in completion_ids]
'''


@pytest.mark.parametrize("script, batch_reuse", [
    # GRPO: one generated batch of 3 x 2 completions feeds 3 optimizer steps of 2 completions each.
    ("grpo", ["--steps_per_generation", "3"]),
    # RLOO: one generated batch of 2 x 2 completions feeds 3 optimizer steps, the same batch each time.
    ("rloo", ["--steps_per_generation", "1", "--num_iterations", "3"]),
])
def test_trl_online_rl_scripts_switch_blocks_between_generations(
        tmp_path, tiny_llama, script, batch_reuse):
    # GRPO and RLOO generate completions with the model being trained (model.generate between optimizer steps,
    # while BAdam has the active layer's requires_grad on and the backward truncation hooks installed), then take
    # three optimizer steps per generated batch: generations before steps 1 and 4. With switch_every=2 the blocks
    # switch inside both batches (after steps 2 and 4), and the second generation falls inside block 1 (its
    # fp32 masters and moments live across it).
    model_dir, out = tmp_path / "model", tmp_path / "out"
    init = save_model(tiny_llama(), model_dir)
    data_dir = write_jsonl(tmp_path / "data", [{"prompt": task(i)[0]} for i in range(16)])
    (tmp_path / "toy_rewards.py").write_text(TOY_REWARDS)

    run_badam(script, model_dir, data_dir, out, [
        "--reward_funcs", "toy_rewards.toy_reward",
        "--max_steps", "6", "--per_device_train_batch_size", "2", "--num_generations", "2",
        "--max_completion_length", "6", "--learning_rate", "1e-3",
        "--save_strategy", "steps", "--save_steps", "6", *batch_reuse,
    ], tmp_path, cwd=tmp_path)

    # Generated (and scored) twice, before optimizer steps 1 and 4 (global_step counts the steps taken).
    assert (tmp_path / "generations.txt").read_text().split() == ["0", "3"]
    assert [h["badam/active_block"] for h in step_logs(out / "checkpoint-6")] == [0, 0, 1, 1, 2, 2]
    final = load_file(out / "model.safetensors")
    assert changed(init, final) == under(init, "model.layers.0", "model.layers.1", "model.layers.2")
