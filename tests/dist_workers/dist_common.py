"""Shared pieces of the torchrun workers used by tests/test_distributed.py (CPU, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from tiny_models import VOCAB, tiny_llama  # tests/, on PYTHONPATH (run_processes puts it there)

from badam_hf.core.hf_features import enable_activation_checkpointing

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 12


def batch(tag: int, step: int, micro: int, rank: int, size: int = 2) -> torch.Tensor:
    """Deterministic token ids, different for every (scenario, step, micro-batch, rank)."""
    g = torch.Generator().manual_seed(1_000_000 * tag + 10_000 * step + 100 * micro + rank)
    return torch.randint(0, VOCAB, (size, SEQ), generator=g)


def training_llama(gc=None):
    """tiny_llama() in train mode; `gc`: None (no checkpointing) or use_reentrant for HF checkpointing."""
    model = tiny_llama()
    model.train()
    if gc is not None:
        enable_activation_checkpointing(model, use_reentrant=gc)
    return model


# TrainingArguments every Trainer worker shares: CPU, quiet, one log per step, deterministic.
CPU_TRAINER_ARGS = dict(use_cpu=True, report_to="none", logging_steps=1, disable_tqdm=True,
                        dataloader_num_workers=0, seed=0)


class Tokens(torch.utils.data.Dataset):
    """Random token rows for the Trainer workers (labels = inputs)."""

    def __init__(self, n: int = 64, seed: int = 123):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def averaged_gradient_run(model, opt, tag: int, steps: int, ga: int, reduce=None, world: int = 2,
                          accumulate=None) -> None:
    """The single-process reference of the distributed tests: per step, each rank's (accumulated) gradients
    are computed in turn and averaged by hand, then the optimizer steps. `reduce`: the dtype gradients are
    accumulated and averaged in before being stored in the weights' dtype (FSDP2's reduce dtype); None: the
    weights' dtype (DDP, ZeRO-3). `accumulate`: the dtype one rank's micro-batches are summed in before that
    sum is rounded to the weights' dtype and averaged there (BAdam's fp32 accumulation under DDP)."""
    from badam_hf.engines.common import set_engine_sync

    set_engine_sync(opt, "single-process reference")  # this process is in a 2-rank group: bypass the guard
    opt.register_grad_keep_check(lambda: True)  # the gradients stay on the parameters, to be summed here by hand
    for step in range(steps):
        grads = [{} for _ in range(world)]
        for rank in range(world):
            for micro in range(ga):
                ids = batch(tag, step, micro, rank)
                (model(input_ids=ids, labels=ids).loss / ga).backward()
                for n, p in model.named_parameters():
                    if p.grad is not None:
                        g = p.grad.to(accumulate or reduce or p.dtype)
                        grads[rank][n] = grads[rank][n] + g if n in grads[rank] else g
                model.zero_grad(set_to_none=True)
            if accumulate is not None:
                params = dict(model.named_parameters())
                grads[rank] = {n: g.to(params[n].dtype) for n, g in grads[rank].items()}
        for n, p in model.named_parameters():
            if n in grads[0]:
                total = grads[0][n] / world
                for g in grads[1:]:
                    total = total + g[n] / world
                p.grad = total.to(p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)


def params_cpu(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}


def error_of(fn, exc: type[BaseException] = Exception) -> str | None:
    """Call fn(); the message of the `exc` it raised, or None if it returned (for the tests to inspect)."""
    try:
        fn()
    except exc as e:
        return str(e)
    return None


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def finish() -> None:
    """End a torchrun worker cleanly: barrier, flush, and skip interpreter teardown (which can abort with
    'terminate called without an active exception' after gloo has been used)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def enable_accelerate_fsdp_on_cpu() -> None:
    """Test-only: accelerate enables FSDP only on GPU-like backends and silently falls back to DDP on CPU.
    Make every AcceleratorState keep its FSDP plugin on CPU (each new AcceleratorState copies PartialState's
    MULTI_CPU again, so the patch acts on every construction), so the real FSDP2 path runs on gloo."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and getattr(self, "fsdp_plugin", None) is None:
            self.fsdp_plugin = fsdp_plugin
        plugin = getattr(self, "fsdp_plugin", None)
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no" and plugin.mixed_precision_policy is None:
                plugin.set_mixed_precision(self._mixed_precision)

    AcceleratorState.__init__ = init


def run_processes(cmd: list[str], extra_env: dict | None = None, timeout: int = 180):
    """Run a multi-process launch (torchrun, accelerate launch) with one thread per process and tests/ on
    PYTHONPATH (for tiny_models); fail with its output if it fails; return the completed process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(extra_env or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, env.get("PYTHONPATH")) if p)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:6]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def launch(worker_path: str, out, extra_env: dict | None = None, timeout: int = 180) -> None:
    """Run a worker under `torchrun --standalone --nproc_per_node 2`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker_path, out]
    run_processes(cmd, extra_env, timeout)


# --- reading what the workers wrote (used by the tests) ---------------------------------------------------


def load(out, name: str):
    return torch.load(os.path.join(out, f"{name}.pt"), weights_only=True)


def read(out, name: str):
    with open(os.path.join(out, f"{name}.json")) as f:
        return json.load(f)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
