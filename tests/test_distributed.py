"""Multi-process DDP: BAdam's reducer rebuild at block switches (badam_hf.distributed).

Two torchrun launches (2 CPU processes, gloo) run several scenarios each (tests/dist_workers/); the tests
here compare what the workers wrote. In-process tests cover the refusals and the fallback path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_common import batch, load, read, same  # tests/dist_workers/, on pytest's pythonpath
from dist_common import launch as run_workers
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from badam_hf import BlockOptimizer
from badam_hf.distributed import DistributedSetupError, attach_ddp, attach_wrapped_model, check_engine
from badam_hf.engines.common import engine_sync

WORKERS = Path(__file__).parent / "dist_workers"

BLOCKS = [f"model.layers.{i}." for i in range(4)]


def launch(worker: str, out: Path) -> None:
    run_workers(WORKERS / worker, out, timeout=120)


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch("ddp_worker.py", out)
    return out


@pytest.fixture(scope="module")
def trainer_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    launch("trainer_worker.py", out)
    return out


# --- plain PyTorch loop + attach_ddp ----------------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.parametrize("scenario", ["plain", "ga_gc", "reentrant", "bf16_ga"])
def test_ddp_ranks_agree_and_equal_reference(ddp_out, scenario, tiny_llama):
    """Ranks trained on different data end bit-identical, and equal to one process that averages the two
    ranks' gradients by hand (SGD inner optimizer, so the comparison is exact). bf16_ga: bf16 weights, GA=4
    under no_sync(); the reference sums each rank's micro-batches in fp32, rounds once, averages in bf16."""
    r0, r1 = load(ddp_out, f"{scenario}_rank0"), load(ddp_out, f"{scenario}_rank1")
    ref = load(ddp_out, f"{scenario}_ref")
    assert same(r0, r1)
    assert same(r0, ref)
    initial = {n: p.detach().to(r0[n].dtype) for n, p in tiny_llama().named_parameters()}
    assert initial.keys() == r0.keys() and not same(r0, initial)  # it trained
    if scenario == "bf16_ga":  # and the fp32 accumulation made a difference
        assert not same(r0, load(ddp_out, f"{scenario}_bf16ref"))


@pytest.mark.multiprocess
@pytest.mark.parametrize("scenario", ["plain", "ga_gc", "reentrant", "bf16_ga"])
def test_ddp_only_active_block_moves_and_blocks_are_revisited(ddp_out, scenario):
    for rank in (0, 1):
        info = read(ddp_out, f"{scenario}_rank{rank}")
        records = info["records"]
        for rec in records:
            prefix = BLOCKS[rec["block"]]
            assert rec["trainable"] and all(n.startswith(prefix) for n in rec["trainable"])
            # Exactly the active block moved at every step (SGD moves every parameter that has a grad; in bf16
            # a norm weight's small update may round away, the matrices' do not).
            if scenario == "bf16_ga":
                assert set(rec["changed"]) <= set(rec["trainable"])
                assert {n for n in rec["trainable"] if "proj" in n} <= set(rec["changed"])
            else:
                assert set(rec["changed"]) == set(rec["trainable"])
        blocks = [rec["block"] for rec in records]
        assert set(blocks) == {0, 1, 2, 3}
        # One rebuild at attach, one per switch: the reducer followed every block, including a revisited one.
        switches = sum(a != b for a, b in zip(blocks, blocks[1:]))
        # (The last step, an even one with switch_every=2, also switches to the next block.)
        assert info["rebuilds"] == 1 + switches + 1
    blocks = [rec["block"] for rec in read(ddp_out, f"{scenario}_rank0")["records"]]
    if scenario != "reentrant":
        assert blocks[-1] == blocks[0]  # a block visited again after the others


@pytest.mark.multiprocess
def test_ddp_without_attach_diverges(ddp_out):
    """Control: without the glue, DDP keeps reducing the block it saw at wrap time only."""
    r0, r1 = load(ddp_out, "control_rank0"), load(ddp_out, "control_rank1")
    blocks = [rec["block"] for rec in read(ddp_out, "control_rank0")["records"]]
    assert blocks == [0, 0, 1, 1]
    differ = {n for n in r0 if not torch.equal(r0[n], r1[n])}
    assert differ and all(n.startswith(BLOCKS[1]) for n in differ)


@pytest.mark.multiprocess
@pytest.mark.parametrize("scenario", ["ratio", "lisa"])
def test_ddp_ratio_and_lisa_ranks_identical_after_period_changes(ddp_out, scenario, tiny_llama):
    """Modes ratio and lisa under DDP: both ranks end bit-identical and equal to one process averaging their
    gradients by hand, through two period changes (new masks / new samples at steps 2 and 4)."""
    r0, r1, ref = load(ddp_out, f"{scenario}_rank0"), load(ddp_out, f"{scenario}_rank1"), load(ddp_out, f"{scenario}_ref")
    assert same(r0, r1) and same(r0, ref)
    initial = {n: p.detach() for n, p in tiny_llama().named_parameters()}
    assert not same(r0, initial)
    for rank in (0, 1):
        info = read(ddp_out, f"{scenario}_rank{rank}")
        records = info["records"]
        if scenario == "ratio":
            assert info["rebuilds"] == 1  # the reducer built at attach covers every step
            assert all(set(r["trainable"]) == set(records[0]["trainable"]) for r in records)
            assert all(n.startswith("model.layers.") for r in records for n in r["changed"])
        else:
            samples = [tuple(r["blocks"]) for r in records]
            assert samples[0::2] == samples[1::2] and len(set(samples[0::2])) >= 2  # a new draw every 2 steps
            for r in records:
                layers = {int(n.split(".")[2]) for n in r["changed"] if n.startswith("model.layers.")}
                assert layers == set(r["blocks"])
                assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(r["changed"])
            assert info["rebuilds"] == 1 + sum(a != b for a, b in zip(samples, samples[1:])) + 1


@pytest.mark.multiprocess
def test_step_guard_refuses_unattached_multi_process(ddp_out):
    for rank in (0, 1):
        res = read(ddp_out, f"guard_rank{rank}")
        for case in ("no_ddp", "unattached_ddp"):
            assert res[case] is not None and "not attached to a distributed engine" in res[case] and "attach_fsdp2" in res[case]
            assert "attach_ddp" in res[case]
            assert res[case + "_unchanged"]
        assert "the ranks train different blocks" in res["mismatch"] and f"this rank: {rank}" in res["mismatch"]
        assert res["bread"] is not None and "inactive_update='sgd' is not supported under DDP" in res["bread"]


# --- Hugging Face Trainer under torchrun -----------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.parametrize("run", ["trainer_optim", "badam_trainer_ga_gc"])
def test_trainer_ddp_ranks_identical_and_visited_blocks_changed(trainer_out, run):
    s0, s1 = load(trainer_out, f"{run}_rank0"), load(trainer_out, f"{run}_rank1")
    info = read(trainer_out, f"{run}_rank0")
    assert info["world_size"] == 2 and info["wrapped"] == "DistributedDataParallel"
    assert read(trainer_out, f"{run}_rank1")["blocks"] == info["blocks"]
    assert same(s0["initial"], s1["initial"])
    assert same(s0["final"], s1["final"])
    visited = set(info["blocks"])
    assert len(visited) >= 3
    for b, names in enumerate(info["block_params"]):
        moved = [n for n in names if not torch.equal(s0["initial"][n], s0["final"][n])]
        if b in visited:
            assert moved == names, f"block {b} was trained but {set(names) - set(moved)} did not move"
        else:
            assert moved == []
    in_blocks = {n for names in info["block_params"] for n in names}
    assert all(torch.equal(s0["initial"][n], s0["final"][n]) for n in s0["initial"] if n not in in_blocks)
    assert info["rebuilds"] >= len(visited)


# --- in-process: refusals and the fallback path -----------------------------------------------------


@pytest.fixture
def one_process_group(tmp_path):
    """A 1-process gloo group, so DistributedDataParallel can be built inside pytest."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_attach_refuses_when_ddp_internals_are_missing(one_process_group, monkeypatch, tiny_llama):
    model = tiny_llama()
    opt = BlockOptimizer(model, lr=0.1, inner_optimizer="sgd", switch_every=1)
    ddp = DDP(model)
    monkeypatch.delattr(DDP, "_ddp_init_helper")
    with pytest.raises(DistributedSetupError, match=r"changed the DistributedDataParallel internals.*_ddp_init_helper"):
        attach_ddp(ddp, opt)
    assert opt.switch_hooks == [] and engine_sync(opt) is None


def test_attach_refuses_when_ddp_internals_change_signature(one_process_group, monkeypatch, tiny_llama):
    model = tiny_llama()
    opt = BlockOptimizer(model, lr=0.1, inner_optimizer="sgd", switch_every=1)
    ddp = DDP(model)
    monkeypatch.setattr(DDP, "_ddp_init_helper", lambda self, parameters, expect_sparse_gradient, mapping: None)
    with pytest.raises(DistributedSetupError, match="changed the DistributedDataParallel internals"):
        attach_ddp(ddp, opt)
    assert opt.switch_hooks == []


def test_attach_one_process_ddp_matches_plain_training(one_process_group, tiny_llama):
    """Attached in one process, DDP training equals training without DDP, across block switches."""

    def train(use_ddp: bool):
        model = tiny_llama()
        opt = BlockOptimizer(model, lr=0.5, inner_optimizer="sgd", switch_every=1, switch_mode="ascending")
        fwd = model
        if use_ddp:
            fwd = DDP(model)
            sync = attach_ddp(fwd, opt)
            assert attach_ddp(fwd, opt) is sync and opt.switch_hooks.count(sync) == 1  # idempotent
        for step in range(5):
            ids = batch(7, step, 0, 0)
            fwd(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    assert same(train(use_ddp=True), train(use_ddp=False))


def test_comm_hooks_survive_rebuilds(one_process_group, tiny_llama):
    """A communication hook (e.g. accelerate's bf16 compression) is registered again on each new reducer."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls = []

    def counting_hook(state, bucket):
        calls.append(1)
        return allreduce_hook(state, bucket)

    model = tiny_llama()
    opt = BlockOptimizer(model, lr=0.5, inner_optimizer="sgd", switch_every=1, switch_mode="ascending")
    ddp = DDP(model)
    ddp.register_comm_hook(None, counting_hook)
    sync = attach_ddp(ddp, opt)
    for step in range(3):
        ids = batch(8, step, 0, 0)
        n = len(calls)
        ddp(input_ids=ids, labels=ids).loss.backward()
        assert len(calls) > n, f"the hook did not run at step {step}"
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert sync.rebuilds == 4 and len(ddp._comm_hooks) == 1


def test_attach_rejects_other_model_and_non_ddp(one_process_group, tiny_llama):
    model, other = tiny_llama(), tiny_llama(seed=1)
    opt = BlockOptimizer(model, lr=0.1, inner_optimizer="sgd")
    with pytest.raises(DistributedSetupError, match="does not wrap the model"):
        attach_ddp(DDP(other), opt)
    with pytest.raises(TypeError, match="needs a DistributedDataParallel"):
        attach_ddp(model, opt)
    with pytest.raises(TypeError, match="needs a badam_hf BlockOptimizer"):
        attach_ddp(DDP(model), torch.optim.SGD(model.parameters(), lr=0.1))


class FullyShardedDataParallel(nn.Module):  # stand-in: detection goes by class name
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_fsdp1_is_refused_before_anything_changes(monkeypatch, tiny_llama):
    model = tiny_llama()
    with pytest.raises(DistributedSetupError, match=r"does not support FSDP \(FSDP version 1\).*fsdp_version: 2"):
        BlockOptimizer(FullyShardedDataParallel(model), lr=0.1)
    assert all(p.requires_grad for p in model.parameters())
    opt = BlockOptimizer(model, lr=0.1)
    with pytest.raises(DistributedSetupError, match="FSDP version 1"):
        attach_wrapped_model(FullyShardedDataParallel(model), opt)
    # `accelerate launch` with an FSDP config announces the version in the environment (read while no
    # Accelerator exists yet in this process: none left over from earlier tests).
    from accelerate.state import AcceleratorState

    monkeypatch.setattr(AcceleratorState, "_shared_state", {})
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    fresh = tiny_llama()
    with pytest.raises(DistributedSetupError, match="FSDP version 1"):
        BlockOptimizer(fresh, lr=0.1)
    assert all(p.requires_grad for p in fresh.parameters())
    monkeypatch.setenv("FSDP_VERSION", "2")
    check_engine(fresh)  # FSDP2 is supported


def test_single_process_needs_no_attach(tiny_llama):
    """One process without DDP: the guard steps aside (the single-process path is unchanged)."""
    model = tiny_llama()
    opt = BlockOptimizer(model, lr=0.5, inner_optimizer="sgd", switch_every=1)
    ids = batch(5, 0, 0, 0)
    model(input_ids=ids, labels=ids).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_several_processes_without_process_group_refused_at_construction(monkeypatch, tiny_llama):
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = tiny_llama()
    with pytest.raises(DistributedSetupError, match=r"2 processes .*not initialised.*attach_ddp"):
        BlockOptimizer(model, lr=0.1)
    assert all(p.requires_grad for p in model.parameters())  # refused before touching the model
