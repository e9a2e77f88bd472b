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
    r = run("--tiny", "--out", str(out), "--blocks", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    b, lora = res["badam"], res["lora_r8_qv"]
    assert res["shape"] == "tiny" and res["seq"] == 32 and res["gradient_checkpointing"] is True
    assert [x["block"] for x in b["per_block"]] == [0, 2, 3]  # evenly spaced active depths, D=4
    for key in ("forward_s", "backward_s", "optimizer_step_s", "full_backward_s"):
        assert b[key] > 0, key
    assert b["fp32_grad_accumulation"] is True and b["inner_fused"] is True
    assert b["paper_badam_gb"] == 23.5 and b["memory"]["peak_rss_gb"] > 0
    assert b["backward_vs_full"] == b["backward_s"] / b["full_backward_s"]
    assert lora["backward_s"] > 0 and set(res["ratios"]) == {
        "badam_vs_lora_memory", "badam_vs_lora_backward", "badam_vs_lora_step"}


def test_refuses_without_a_gpu_in_one_line(tmp_path):
    r = run("--out", str(tmp_path / "x.json"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "--tiny" in lines[0]
    assert not (tmp_path / "x.json").exists()
