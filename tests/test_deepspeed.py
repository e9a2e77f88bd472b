"""DeepSpeed ZeRO-3 (experimental): block switching, the Trainer path, resume and refusals.

Two torchrun launches (2 CPU processes, gloo, DS_ACCELERATOR=cpu) run several scenarios each
(tests/dist_workers/deepspeed_worker.py: plain loop; deepspeed_trainer_worker.py: Hugging Face Trainer);
the tests compare what the workers wrote. Configuration refusals are checked in-process. The first run on a
machine compiles one DeepSpeed CPU op (about a minute); later runs reuse it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import deepspeed
import pytest
import torch
from dist_common import launch as launch_workers, load, read, run_processes, same  # tests/dist_workers/

from badam_hf import BlockOptimizer  # noqa: E402
from badam_hf.deepspeed_zero3 import (  # noqa: E402
    ALLOW_UNTESTED_ENV,
    check_config,
    check_training_args,
    check_version,
)
from badam_hf.distributed import DistributedSetupError  # noqa: E402

WORKERS = Path(__file__).parent / "dist_workers"
CONFIG = Path(__file__).parent.parent / "configs" / "deepspeed_zero3.json"

# The worker's scenarios: name -> (switch mode, steps, partition granularity, absolute tolerance vs reference).
SCENARIOS = {
    "plain": ("ascending", 10, "layer", 1e-6),
    "ga_gc": ("random", 8, "layer", 1e-6),
    "reentrant": ("descending", 8, "layer", 1e-6),
    # AdamW divides by sqrt(v): on elements with a tiny gradient an ulp-level gradient difference grows to
    # about 1e-6 here; one missed or extra step would still move elements by about lr = 1e-2.
    "offload": ("ascending", 6, "attn_mlp", 1e-5),
}


def launch(worker: str, out: Path) -> None:
    # The first DeepSpeed start on a machine compiles a CPU op (about a minute): a generous timeout.
    launch_workers(WORKERS / worker, out, extra_env={"DS_ACCELERATOR": "cpu"}, timeout=420)


@pytest.fixture(scope="module")
def ds_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    launch("deepspeed_worker.py", out)
    return out


@pytest.fixture(scope="module")
def trainer_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed_trainer")
    launch("deepspeed_trainer_worker.py", out)
    return out


def initial_params(tiny_llama) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in tiny_llama().named_parameters()}


def expected_blocks(tiny_llama, mode: str, steps: int, granularity: str = "layer") -> list[int]:
    opt = BlockOptimizer(tiny_llama(), switch_every=2, switch_mode=mode, granularity=granularity)
    return [opt.schedule.block_at(t) for t in range(steps)]


# --- plain loop: deepspeed.initialize(optimizer=BlockOptimizer) + attach_deepspeed ---------------------


@pytest.mark.multiprocess
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_zero3_ranks_agree_and_match_reference(ds_out, scenario, tiny_llama):
    """Ranks trained on different data end bit-identical (full parameters gathered from the shards), and
    equal one process without DeepSpeed that averages the two ranks' gradients by hand (SGD inner
    optimizer, fp32, no clipping; "offload" uses AdamW with weight decay). DeepSpeed computes the same
    gradients up to float rounding (its gathered weights sit in flat buffers and CPU kernels may round
    differently: about 1e-9 per step), so the comparison allows a few float32 ulps (atol 1e-6); a missed or
    extra update changes parameters by about lr * grad (1e-3 here) and fails it."""
    r0, r1 = load(ds_out, f"{scenario}_rank0"), load(ds_out, f"{scenario}_rank1")
    ref = load(ds_out, f"{scenario}_ref")
    assert same(r0, r1)
    assert r0.keys() == ref.keys()
    atol = SCENARIOS[scenario][3]
    for name in r0:
        torch.testing.assert_close(r0[name], ref[name], rtol=1e-5, atol=atol, msg=name)
    init = initial_params(tiny_llama)
    assert not same(r0, init)  # it trained
    # Parameters in no block (embeddings, final norm, head) are untouched, bit for bit.
    in_blocks = {n for rec in read(ds_out, f"{scenario}_rank0")["records"] for n in rec["trainable"]}
    for name in set(r0) - in_blocks:
        assert torch.equal(r0[name], init[name]), name


@pytest.mark.multiprocess
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_zero3_only_active_block_moves_and_steps_count_once(ds_out, scenario, tiny_llama):
    mode, steps, granularity, _ = SCENARIOS[scenario]
    for rank in (0, 1):
        data = read(ds_out, f"{scenario}_rank{rank}")
        records = data["records"]
        assert [r["block"] for r in records] == expected_blocks(tiny_llama, mode, steps, granularity)
        for i, rec in enumerate(records):
            # exactly the active block moved, and DeepSpeed's trainable set is that block
            assert sorted(rec["changed"]) == sorted(rec["trainable"]), (scenario, i)
            assert sorted(rec["ds_trainable"]) == sorted(rec["trainable"]), (scenario, i)
            assert rec["masters"] == 0  # DeepSpeed owns the fp32 masters
            assert rec["groups"] == 2  # decay / no-decay groups kept (DeepSpeed drops empty ones at init)
            # one BAdam step per optimizer step, although DeepSpeed calls the client once per sub-group
            assert rec["global_step"] == i + 1
            assert rec["client_calls"] == rec["sub_groups"]
        switches = sum(a["block"] != b["block"] for a, b in zip(records, records[1:]))
        assert data["rebuilds"] == switches + 1 + (records[-1]["global_step"] % 2 == 0)  # +attach, +last switch
    if scenario == "plain":
        assert records[0]["sub_groups"] > 1  # the sub-group case is really exercised
        assert records[0]["block"] == records[-1]["block"] == 0  # block 0 is revisited


@pytest.mark.multiprocess
def test_zero3_bf16_masters_belong_to_deepspeed(ds_out, tiny_llama):
    data = [read(ds_out, f"bf16_rank{r}") for r in (0, 1)]
    assert same(load(ds_out, "bf16_rank0"), load(ds_out, "bf16_rank1"))
    final = load(ds_out, "bf16_rank0")
    init = {n: p.to(torch.bfloat16) for n, p in initial_params(tiny_llama).items()}
    blocks = {n for n in init if n.startswith("model.layers.")}
    assert set(data[0]["changed"]) == blocks  # all four blocks visited (ascending, 8 steps) and trained
    assert all(torch.equal(final[n], init[n]) for n in set(init) - blocks)
    for d in data:
        assert d["dtypes"] == ["torch.bfloat16"]
        # BlockOptimizer makes masters at a block's first step; under ZeRO-3 it never makes one (8 steps).
        assert d["masters_before_attach"] == 0 and d["masters_after"] == 0
        assert d["ds_master_dtypes"] == ["torch.float32"]
        assert d["state_on_flats"] == [True] * 4  # AdamW state lives on DeepSpeed's partitions only
        assert d["inner_state_after_switch"] == 0  # and is dropped at a switch
        assert d["global_step"] == 8


@pytest.mark.multiprocess
def test_zero3_refusals(ds_out):
    for rank in (0, 1):
        errors = read(ds_out, f"errors_rank{rank}")
        assert "not attached" in errors["unattached"] and errors["unattached_steps"] == 0
        assert "attach_deepspeed" in errors["unattached_single"] and errors["unattached_single_steps"] == 0
        for stage in (1, 2):
            assert f"ZeRO stage {stage}" in errors[f"stage{stage}"] and "stage\": 3" in errors[f"stage{stage}"]
        assert "\"optimizer\" block" in errors["optimizer_block"] and "remove it" in errors["optimizer_block"]
        assert "parameter offload" in errors["offload_param"]
        assert "ranks train different blocks" in errors["mismatch"]
        assert "always-active parameters ('model.norm.weight'" in errors["always_active"]


# --- Hugging Face Trainer with configs/deepspeed_zero3.json ------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.parametrize("run,mode,steps", [("trainer_optim", "ascending", 10), ("badam_trainer_ga_gc", "random", 6)])
def test_trainer_zero3_trains_every_visited_block(trainer_out, run, mode, steps, tiny_llama):
    r0, r1 = load(trainer_out, f"{run}_rank0"), load(trainer_out, f"{run}_rank1")
    assert same(r0["final"], r1["final"])
    for rank in (0, 1):
        info = read(trainer_out, f"{run}_rank{rank}")
        assert info["wrapped"] == "DeepSpeedEngine" and info["sync"] == "DeepSpeedBlockSync"
        assert info["world_size"] == 2 and info["steps"] == steps
        assert info["blocks"] == expected_blocks(tiny_llama, mode, steps)
    info = read(trainer_out, f"{run}_rank0")
    final = r0["final"]
    dtype = next(iter(final.values())).dtype
    initial = {n: t.to(dtype) for n, t in r0["initial"].items()}
    visited = {n for b in set(info["blocks"]) for n in info["block_params"][b]}
    changed = {n for n in final if not torch.equal(final[n], initial[n])}
    assert changed == visited
    if run == "badam_trainer_ga_gc":
        assert info["dtypes"] == ["torch.bfloat16"]  # bf16 "auto" followed TrainingArguments(bf16=True)


@pytest.mark.multiprocess
def test_trainer_zero3_resume_mid_block_matches_uninterrupted(trainer_out):
    """Checkpoint at step 3 (the second step of block 1), resume in a fresh Trainer: same final parameters,
    bit for bit, as the uninterrupted run (AdamW moments and fp32 partitions restored)."""
    for rank in (0, 1):
        full, resumed = load(trainer_out, f"full_rank{rank}"), load(trainer_out, f"resumed_rank{rank}")
        assert same(full["final"], resumed["final"])
        assert not same(full["final"], full["initial"])
        info_full, info_res = read(trainer_out, f"full_rank{rank}"), read(trainer_out, f"resumed_rank{rank}")
        assert info_full["blocks"] == [0, 0, 1, 1, 2, 2]
        assert info_res["blocks"] == info_full["blocks"][3:]
        assert info_res["steps"] == 6


@pytest.mark.multiprocess
def test_trainer_zero3_zero_init_model(trainer_out):
    """A model whose parameters are already ZeRO-3 partitioned when BAdam sees it (from_pretrained under a
    ZeRO-3 config builds it inside deepspeed.zero.Init)."""
    info = read(trainer_out, "zero_init_rank0")
    assert "error" not in info, info.get("error")
    r0, r1 = load(trainer_out, "zero_init_rank0"), load(trainer_out, "zero_init_rank1")
    assert same(r0["final"], r1["final"])
    assert info["blocks"] == [0, 0, 1, 1]
    changed = {n for n in r0["final"] if not torch.equal(r0["final"][n], r0["initial"][n])}
    assert changed == set(info["block_params"][0]) | set(info["block_params"][1])


# --- refusals before training (in-process) -------------------------------------------------------------


def zero3(**zero):
    return {"zero_optimization": {"stage": 3, **zero}}


def test_shipped_config_is_accepted_and_leaves_the_optimizer_to_badam():
    cfg = json.loads(CONFIG.read_text())
    check_config(cfg)
    check_config(str(CONFIG))
    assert "optimizer" not in cfg and cfg["zero_optimization"]["stage"] == 3
    assert cfg["bf16"]["enabled"] == "auto" and cfg["gradient_clipping"] == "auto"


@pytest.mark.parametrize(
    "config,match",
    [
        ({"zero_optimization": {"stage": 1}}, r"stage=1.*Use \"stage\": 3, or DistributedDataParallel"),
        ({"zero_optimization": {"stage": 2}}, r"stage=2.*Use \"stage\": 3, or DistributedDataParallel"),
        ({}, r"stage=0"),
        ({**zero3(), "optimizer": {"type": "AdamW"}}, r"\"optimizer\" block \('AdamW'\).*Remove the"),
        ({**zero3(), "fp16": {"enabled": True}}, r"enables fp16; BAdam supports bf16"),
        (zero3(offload_param={"device": "cpu"}), r"offload_param.device='cpu'.*does not support"),
        (zero3(offload_optimizer={"device": "nvme"}), r"offload_optimizer.device='nvme'.*\"cpu\" only"),
        (zero3(offload_optimizer={"device": "cpu"}), r"zero_force_ds_cpu_optimizer\": false"),
    ],
)
def test_bad_deepspeed_configs_are_refused(config, match):
    with pytest.raises(DistributedSetupError, match=match):
        check_config(config)


@pytest.mark.parametrize("force", [False, "false", True, "true"])
def test_cpu_optimizer_offload_needs_the_client_optimizer(force):
    """CPU optimizer offload is accepted exactly when DeepSpeed is told to run the client optimizer (BAdam) there
    (as the worker's "offload" scenario trains), the flag given as a bool or as a string from a JSON/CLI config;
    with the flag true (or missing: test_bad_deepspeed_configs_are_refused), DeepSpeed would swap in its own CPU
    Adam, so the config is refused."""
    config = {**zero3(offload_optimizer={"device": "cpu"}), "zero_force_ds_cpu_optimizer": force}
    if force in (False, "false"):
        check_config(config)  # accepted: no error
    else:
        with pytest.raises(DistributedSetupError, match=r"zero_force_ds_cpu_optimizer\": false is set"):
            check_config(config)


def test_training_args_with_optimizer_block_are_refused():
    args = SimpleNamespace(hf_deepspeed_config=None, deepspeed={**zero3(), "optimizer": {"type": "AdamW"}})
    with pytest.raises(DistributedSetupError, match="BAdam must be the optimizer"):
        check_training_args(args)
    check_training_args(SimpleNamespace(hf_deepspeed_config=SimpleNamespace(config=zero3()), deepspeed=None))
    check_training_args(SimpleNamespace(hf_deepspeed_config=None, deepspeed=None))  # no DeepSpeed at all


def test_untested_deepspeed_version_is_refused_or_warned(monkeypatch):
    assert check_version() == deepspeed.__version__  # the installed one is in the tested range
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    for version in ("0.18.9", "0.20.0", "1.0.0"):
        with pytest.raises(DistributedSetupError, match=rf"deepspeed {version} is installed.*>=0.19,<0.20"):
            check_version(version)
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(RuntimeWarning, match="tested with deepspeed>=0.19,<0.20"):
        check_version("0.20.1")


@pytest.fixture
def hf_deepspeed_args(monkeypatch):
    """Real TrainingArguments with a DeepSpeed config, in this process: undo the global state they leave
    (transformers' HfDeepSpeedConfig reference, which makes later models think ZeRO-3 is on; accelerate's
    shared state; the environment) so the rest of the suite is unaffected."""
    from accelerate.state import AcceleratorState, PartialState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")  # TrainingArguments sets it; restored afterwards
    yield {**zero3(), "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}, "train_micro_batch_size_per_gpu": "auto"}
    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def test_optimizer_block_refused_when_the_arguments_are_parsed(hf_deepspeed_args, tmp_path):
    """Through real TrainingArguments (where --optim badam and --deepspeed meet) and BAdamTrainer: the
    Trainer would otherwise silently train with DeepSpeed's optimizer and never build BAdam's."""
    from transformers import TrainingArguments

    with pytest.raises(DistributedSetupError, match="BAdam must be the optimizer"):
        TrainingArguments(output_dir=str(tmp_path), optim="badam", deepspeed=hf_deepspeed_args, use_cpu=True,
                          report_to="none")


def test_optimizer_block_refused_by_badam_trainer(hf_deepspeed_args, tmp_path, tiny_llama):
    from transformers import TrainingArguments

    from badam_hf import BAdamTrainer

    args = TrainingArguments(output_dir=str(tmp_path), deepspeed=hf_deepspeed_args, use_cpu=True, report_to="none")
    with pytest.raises(DistributedSetupError, match="BAdam must be the optimizer"):
        BAdamTrainer(model=tiny_llama(), args=args)


@pytest.mark.multiprocess
def test_recipe_runs_under_the_shipped_zero3_config(tmp_path):
    """`torchrun ... -m badam_hf train llama3-8b-alpaca-gpt4 training.deepspeed=configs/deepspeed_zero3.json`
    with a tiny stand-in model and local data: a zero.Init-partitioned model, both blocks trained, one
    summary, and the final save (gathered 16-bit weights) equal to the last checkpoint's."""
    from safetensors.torch import load_file
    from test_recipes import tiny_overrides

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           WORKERS / "recipe_deepspeed_worker.py", "train", "llama3-8b-alpaca-gpt4",
           *tiny_overrides("llama3-8b-alpaca-gpt4", tmp_path), f"training.deepspeed={CONFIG}"]
    proc = run_processes(cmd, {"DS_ACCELERATOR": "cpu"}, timeout=420)
    assert proc.stdout.count("badam-hf train:") == 1 and "blocks visited: 2 of 2" in proc.stdout
    final = load_file(tmp_path / "out" / "model.safetensors")
    last = load_file(tmp_path / "out" / "checkpoint-2" / "model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[n], last[n]) for n in final)
    assert all(v.numel() > 0 for v in final.values())  # gathered, not ZeRO-3's empty partitions
