"""benchmarks/gpu_check.sh: the prepared GPU check runs end to end in its --tiny CPU mode and refuses to start
without a GPU otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def run(*args, env=None):
    env = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.integration  # the whole GPU-check script in a subprocess
def test_tiny_mode_writes_the_json(tmp_path):
    out = tmp_path / "check.json"
    r = run("--tiny", "--out", str(out), "--blocks", "3", "--switch-every", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    b, lora = res["badam"], res["lora_r8_qv"]
    assert res["shape"] == "tiny" and res["seq"] == 32 and res["gradient_checkpointing"] is True
    assert [x["block"] for x in b["per_block"]] == [0, 2, 3]  # evenly spaced active depths, D=4
    for key in ("forward_s", "backward_s", "optimizer_step_s", "full_backward_s"):
        assert b[key] > 0, key
    assert b["fp32_grad_accumulation"] is True and b["inner_fused"] is True
    assert b["paper_badam_gb"] == 23.5 and b["memory"]["peak_rss_gb"] > 0
    # The baseline of backward_vs_full is a full backward: it reaches every parameter (embedding included),
    # BAdam's truncation and frozen layers undone.
    assert b["full_backward_params_with_grad"] == b["num_params"] == 4 * 9 + 3  # 4 layers; embedding, norm, head
    assert lora["backward_s"] > 0 and set(res["ratios"]) == {
        "badam_vs_lora_memory", "badam_vs_lora_backward", "badam_vs_lora_step"}
    # The steady state: a block's first step and a later step at K=2, each measured (here: live tensor bytes of
    # the CPU tensors) beside the dry run's prediction on meta tensors, which must agree to the byte.
    ss = res["steady_state"]
    assert ss["switch_every"] == 2 and [s["step"] for s in ss["steps"]] == [
        "first step of a block", "later step (K=2)", "checkpoint save"]
    for s in ss["steps"]:
        assert s["measured_bytes"] == s["predicted_bytes"] > 0, s
    first, later, save = ss["steps"]
    assert save["predicted_phase"] == "checkpoint save"
    # With the chunked loss (BAdam's default) the later step's peak is no longer at the loss. The later step ends
    # the block (K=2): its peak is in the backward, or at this tiny shape in the write-back, where the default
    # stochastic rounding holds the noise tables of the whole block (about 16 KB a tensor, whatever its size)
    # beside one pass's int32 buffer; predicted equals measured either way (above).
    assert first["predicted_phase"] == "step: inner AdamW"
    assert later["predicted_phase"] in ("backward", "step: write back")
    for mem in (b["memory"], lora["memory"]):
        assert mem["predicted_max_allocated_gb"] > 0
    assert "predicted" in r.stdout and "later step (K=2)" in r.stdout


def test_switch_every_below_two_is_refused(tmp_path):
    r = run("--tiny", "--out", str(tmp_path / "x.json"), "--switch-every", "1")
    assert r.returncode == 2 and "--switch-every 1" in r.stderr
    assert not (tmp_path / "x.json").exists()


def test_refuses_without_a_gpu_in_one_line(tmp_path):
    r = run("--out", str(tmp_path / "x.json"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "--tiny" in lines[0]
    assert not (tmp_path / "x.json").exists()
