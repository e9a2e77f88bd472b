"""Smoke test of benchmarks/convergence.py: every method on the real model and the shared Alpaca records, scaled
down (2 steps, 24 records, all methods in one process); checks what it writes. Skipped when the shared data file
is absent."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from badam_hf.integrations import pretrained

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "convergence.py"
DATA = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"
METHODS = ["badam", "badam_ratio", "lisa", "badam_bread", "badam_bread_sign", "adamw", "lora", "lora_all", "reference"]


@pytest.mark.integration
@pytest.mark.skipif(not DATA.exists(), reason=f"{DATA} is absent")
def test_convergence_small(tmp_path, smollm2_cache):
    out = tmp_path / "conv"
    cmd = [sys.executable, str(SCRIPT), "--data", str(DATA), "--out", str(out), "--no-isolate", "--steps", "2",
           "--switch-every", "2", "--max-records", "24", "--cutoff-len", "32", "--eval-every", "2",
           "--methods", ",".join(METHODS)]
    env = dict(os.environ, **{pretrained.CACHE_ENV: str(smollm2_cache)})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = json.loads((out / "results.json").read_text())
    assert list(s["results"]) == METHODS
    assert s["train_records"] + s["held_out_records"] == 24 and s["held_out_records"] >= 2
    train = {r["instruction"] + r.get("input", "") for r in json.loads((out / "train.json").read_text())}
    held = {r["instruction"] + r.get("input", "") for r in json.loads((out / "held_out.json").read_text())}
    assert not train & held
    for name, r in s["results"].items():
        assert [c[0] for c in r["held_out_curve"]] == [2], name
        assert math.isfinite(r["held_out_loss_after"]) and r["held_out_loss_before"] == s["held_out_loss_before"]
        assert r["seconds_per_step"] > 0 and r["peak_rss_gb"] > 0
        # found inside accelerate's and the authors' wrappers too (K=2: the first step does not switch, its state stays)
        assert r["optimizer_state_bytes"] > 0, name
    res = s["results"]
    # BAdam (ours) trains one layer at a time, LISA two sampled layers and the tied embeddings, ratio 5% of every
    # layer; LoRA on every linear layer has more adapters than on q, v alone.
    assert res["badam"]["blocks_visited"] == 1 and res["badam"]["num_blocks"] == 30
    assert res["lisa"]["blocks_visited"] == 2 and res["badam_ratio"]["blocks_visited"] == 30
    layer = res["badam"]["trainable_parameters"]
    embeddings = 49152 * 576
    assert res["lisa"]["trainable_parameters"] == 2 * layer + embeddings + 576  # + the final norm
    assert 0.045 * 30 * layer < res["badam_ratio"]["trainable_parameters"] < 0.05 * 30 * layer
    assert res["badam_bread"]["trainable_parameters"] == layer
    assert res["lora"]["trainable_parameters"] < res["lora_all"]["trainable_parameters"] < res["adamw"]["trainable_parameters"]
    md = (out / "results.md").read_text()
    assert "| BAdam (badam_hf) |" in md and "| LISA, 2 layers (badam_hf) |" in md and "| BAdam (authors' badam 1.4) |" in md and "| LoRA r=8 (all linear) |" in md


def test_missing_data_exits_cleanly(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "no such file" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_bad_methods_exit_cleanly(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(DATA if DATA.exists() else SCRIPT), "--out", str(tmp_path / "o"),
         "--methods", "badam,sgd"], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "choose from badam, badam_ratio, lisa, badam_bread, badam_bread_sign, adamw, lora, lora_all, reference" in proc.stderr
    assert not (tmp_path / "o").exists()
