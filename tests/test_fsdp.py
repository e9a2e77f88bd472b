"""FSDP2 (`fully_shard`): BAdam's block switches on sharded DTensor parameters (badam_hf.fsdp).

One torchrun launch (2 CPU processes, gloo) runs every scenario in tests/dist_workers/fsdp_worker.py; the
tests compare what it wrote with a single-process reference that averages the two ranks' gradients.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from dist_common import launch, load, read, run_processes  # tests/dist_workers/, on pytest's pythonpath

pytestmark = pytest.mark.multiprocess  # every test here reads what a 2-process launch wrote

WORKERS = Path(__file__).parent / "dist_workers"

LAYER = [f"model.layers.{i}." for i in range(4)]
ORDERS = {  # switch_every=2; ascending/descending revisit the first block after 8 steps
    "bf16": [0, 0, 1, 1, 2, 2, 3, 3, 0, 0],
    "fp32": [3, 3, 2, 2, 1, 1, 0, 0],
    "upcast": [0, 0, 1, 1, 2, 2],
}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    path = tmp_path_factory.mktemp("fsdp")
    launch(WORKERS / "fsdp_worker.py", path)
    return path


def layer_numel(tiny_llama, i: int) -> int:
    return sum(p.numel() for n, p in tiny_llama().named_parameters() if n.startswith(LAYER[i]))


@pytest.mark.parametrize("scenario", ["bf16", "ga_gc", "fp32", "ratio", "lisa"])
def test_fsdp2_equals_gradient_averaging_reference(out, scenario, tiny_llama):
    """Sharded training (bf16 weights with fp32 reduction, GA + checkpointing, fp32 weights) ends bit-identical
    to one process that averages the two ranks' gradients by hand (SGD, so the comparison is exact)."""
    trained, ref = load(out, scenario), load(out, f"{scenario}_ref")
    assert trained.keys() == ref.keys()
    assert all(torch.equal(trained[n], ref[n]) for n in ref), [n for n in ref if not torch.equal(trained[n], ref[n])]
    initial = dict(tiny_llama().named_parameters())
    assert any(not torch.equal(trained[n].float(), initial[n].float()) for n in trained)


@pytest.mark.parametrize("scenario", ["bf16", "ga_gc", "fp32", "upcast"])
def test_only_the_active_block_moves_and_state_is_sharded(out, scenario, tiny_llama):
    for rank in (0, 1):
        rec = read(out, f"{scenario}_rank{rank}")
        blocks = [r["block"] for r in rec["records"]]
        if scenario in ORDERS:
            assert blocks == ORDERS[scenario]
        assert set(blocks) == {0, 1, 2, 3} or scenario == "upcast"
        for r in rec["records"]:
            assert r["changed"], r
            assert all(n.startswith(LAYER[r["block"]]) for n in r["changed"]), r
            # fp32 masters for this rank's half of the active layer only (SGD keeps no moments).
            assert r["state_bytes"] == 4 * layer_numel(tiny_llama, r["block"]) // 2
        switches = sum(a != b for a, b in zip(blocks, blocks[1:]))
        # At attach, at every switch, and at the switch the last step triggers (the runs end on a boundary).
        assert rec["refreshes"] == 1 + switches + 1


def test_fsdp2_ratio_state_is_the_shards_of_the_selection_and_lisa_follows_samples(out, tiny_llama):
    """Mode ratio: each rank holds fp32 masters for its rows of the selected entries only (SGD: no moments), and
    the two ranks' parts add up to the whole selection. Mode lisa: the sampled layers and the outside train."""
    from badam_hf.core.selection import selection_size

    model = tiny_llama()
    params = dict(model.named_parameters())
    in_layers = [n for n in params if n.startswith("model.layers.")]
    total = sum(selection_size(params[n].numel(), 0.2) for n in in_layers)
    recs = [read(out, f"ratio_rank{r}")["records"] for r in (0, 1)]
    for step in range(6):
        assert recs[0][step]["state_bytes"] + recs[1][step]["state_bytes"] == 4 * total
        assert 0 < recs[0][step]["state_bytes"] < 4 * total
    for rank in (0, 1):
        for r in read(out, f"lisa_rank{rank}")["records"]:
            layers = {int(n.split(".")[2]) for n in r["changed"] if n.startswith("model.layers.")}
            assert layers == set(r["blocks"]) and "model.embed_tokens.weight" in r["changed"]


def test_sharded_resume_is_bit_exact(out):
    both = load(out, "resume")
    assert all(torch.equal(both["straight"][n], both["resumed"][n]) for n in both["straight"])
    for rank in (0, 1):
        rec = read(out, f"resume_rank{rank}")
        assert rec["saved_in_block"] == 1  # saved mid-block (switch_every=2)
        assert rec["resumed_block"] == rec["saved_block"]
        assert "split over 4 rank(s)" in rec["wrong_world"] and "this run has 2" in rec["wrong_world"]


def test_without_dtype_refresh_the_first_switch_fails(out):
    """The negative control: fp32 shards computed in bf16, optimizer not attached. The block frozen at the
    first forward has no reduce dtype and its first backward fails (pytorch issue 186998)."""
    for rank in (0, 1):
        error = read(out, f"control_rank{rank}")["error"]
        assert error is not None and "grad_dtype" in error


def test_optimizer_built_before_sharding_and_unattached_model(out):
    for rank in (0, 1):
        rec = read(out, f"misuse_rank{rank}")
        # Built on the unsharded model: attach_fsdp2 rebinds to the DTensors; block 0 trains, masters are halves.
        assert rec["built_before_shard_changed"] and all(n.startswith(LAYER[0]) for n in rec["built_before_shard_changed"])
        assert rec["master_rows"] == [16, 8, 8, 16, 32, 32, 16, 16, 16]  # q,k,v,o,gate,up,down,2 norms: rows / 2
        assert "attach_fsdp2" in rec["unattached"]


# --- Hugging Face Trainer + accelerate FSDP2 (accelerate's FSDP switched on for CPU in the worker) ---------


@pytest.fixture(scope="module")
def trainer_out(tmp_path_factory):
    path = tmp_path_factory.mktemp("fsdp_trainer")
    launch(WORKERS / "fsdp_trainer_worker.py", path)
    return path


@pytest.mark.parametrize("run,order,dtype", [
    ("badam_bf16", [0, 1, 2, 3, 0, 1], "torch.bfloat16"),  # BAdamTrainer, bf16 weights, bf16=False
    ("optim_fp32_mp", [3, 2, 1, 0, 3], "torch.float32"),  # Trainer --optim badam, fp32 weights, bf16=True
])
def test_trainer_fsdp2_trains_block_by_block(trainer_out, run, order, dtype):
    for rank in (0, 1):
        rec = read(trainer_out, f"{run}_rank{rank}")
        assert rec["model_class"] == "FSDPLlamaForCausalLM" and rec["sharded"] and rec["dtypes"] == [dtype]
        assert rec["sync"] == "FSDP2BlockSync"
        assert [r["block"] for r in rec["records"]] == order
        for r in rec["records"]:
            assert r["changed"] and all(n.startswith(LAYER[r["block"]]) for n in r["changed"]), r
        # The optimizer was built before accelerate sharded the model; its masters are this rank's halves.
        for name, (local, full) in rec["master_shapes"].items():
            assert local[0] == full[0] // 2 and local[1:] == full[1:], name


@pytest.mark.parametrize("variant", ["ram_efficient", "fsdp_ac"])
def test_trainer_fsdp2_loading_and_checkpointing_variants(trainer_out, variant):
    """accelerate's cpu_ram_efficient_loading (the 70B config's: rank 0's weights, the others empty, the model
    re-filled after sharding) and accelerate's own activation checkpointing (which wraps each layer and
    renames its parameters): the optimizer follows, and the run equals the plain one bit for bit."""
    plain, other = load(trainer_out, "badam_bf16"), load(trainer_out, variant)
    assert plain.keys() == other.keys() and all(torch.equal(plain[n], other[n]) for n in plain)
    assert [r["block"] for r in read(trainer_out, f"{variant}_rank1")["records"]] == [0, 1, 2, 3, 0, 1]


def test_trainer_fsdp2_checkpoint_resume_is_bit_exact(trainer_out, tiny_llama):
    both = load(trainer_out, "resume")
    assert all(torch.equal(both["straight"][n], both["resumed"][n]) for n in both["straight"])
    initial = {n: p.detach().to(torch.bfloat16).float() for n, p in tiny_llama().named_parameters()}
    assert any(not torch.equal(both["straight"][n], initial[n]) for n in initial)
    for rank in (0, 1):
        assert read(trainer_out, f"resume_rank{rank}")["files"] == ["rank0-of-2.pt", "rank1-of-2.pt"]


def test_trainer_fsdp2_refuses_partial_upcast(trainer_out):
    for rank in (0, 1):
        msg = read(trainer_out, f"resume_rank{rank}")["refused"]
        assert msg and "mixed_precision='bf16'" in msg and "bf16=False" in msg


# --- the shipped FSDP2 config + 70B recipe, through `accelerate launch` and `badam-hf train` ---------------


def test_70b_recipe_runs_under_the_shipped_fsdp2_config(tmp_path):
    """`accelerate launch --config_file configs/accelerate_fsdp2.yaml -m badam_hf train llama3-70b-mathinstruct`
    with a tiny stand-in model and local data (2 CPU processes, accelerate's FSDP switched on for CPU): the
    run trains both blocks, prints one summary, and the final model (gathered from the shards, since the
    config checkpoints sharded) equals the last sharded checkpoint."""
    from safetensors.torch import load_file
    from test_recipes import tiny_overrides
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate_fsdp2.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
           WORKERS / "recipe_fsdp_worker.py", "train", "llama3-70b-mathinstruct",
           *tiny_overrides("llama3-70b-mathinstruct", tmp_path)]
    proc = run_processes(cmd, timeout=300)
    assert proc.stdout.count("badam-hf train:") == 1 and "blocks visited: 2 of 2" in proc.stdout
    out = tmp_path / "out"
    saved = load_file(out / "model.safetensors")
    dcp_to_torch_save(out / "checkpoint-2" / "pytorch_model_fsdp_0", tmp_path / "checkpoint.pt")
    sharded = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert saved.keys() == sharded.keys() and all(torch.equal(saved[n], sharded[n]) for n in saved)
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    files = sorted(p.name for p in (out / "checkpoint-2" / "optimizer_badam").iterdir())
    assert files == ["rank0-of-2.pt", "rank1-of-2.pt"]
