"""Smoke test of benchmarks/convergence.py: BAdam, AdamW and LoRA on the real Alpaca records, tiny setting.

Runs the script end to end (all methods in one process, a tiny Llama, 64 records, a few steps) and checks
what it writes: a PNG, results.json with the three methods' finite per-step losses on the same steps,
BAdam's block switches where its schedule puts them, and a falling BAdam loss. Skipped when the shared
data file is absent.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # runs the benchmark script end to end in a subprocess

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "convergence.py"
DATA = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"

needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"{DATA} is absent")

STEPS, SWITCH_EVERY = 24, 4


@needs_data
def test_convergence_tiny(tmp_path):
    out = tmp_path / "conv"
    cmd = [
        sys.executable, str(SCRIPT), "--data", str(DATA), "--out", str(out), "--no-isolate",
        "--steps", str(STEPS), "--max-records", "64", "--cutoff-len", "96", "--vocab-size", "300",
        "--batch-size", "4", "--hidden-size", "32", "--num-layers", "2", "--lr", "5e-3", "--warmup-steps", "2",
        "--switch-every", str(SWITCH_EVERY), "--switch-mode", "descending", "--window", "4",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    png = (out / "convergence.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000

    s = json.loads((out / "results.json").read_text())
    assert s["random_init"] is True
    assert set(s["results"]) == {"badam", "adamw", "lora"}
    for name, r in s["results"].items():
        assert r["steps"] == list(range(1, STEPS + 1)), name
        assert len(r["losses"]) == STEPS and all(math.isfinite(x) and x > 0 for x in r["losses"]), name
        assert r["all_finite"] and math.isfinite(r["final_loss"]), name
    # Same initial weights and the same first batch for every method: the step-1 losses agree.
    first = [r["losses"][0] for r in s["results"].values()]
    assert max(first) - min(first) < 1e-3, first

    badam = s["results"]["badam"]
    # 2 layers + the output side; descending order starts at the head, switches every SWITCH_EVERY steps.
    assert badam["block_names"] == ["model.layers.0", "model.layers.1", "lm_head"]
    assert s["badam_switch_steps"] == list(range(SWITCH_EVERY, STEPS, SWITCH_EVERY))
    assert badam["final_loss"] < badam["first_loss"] - 0.05, (badam["first_loss"], badam["final_loss"])
    # LoRA trains only its adapters, AdamW everything.
    assert s["results"]["lora"]["trainable_parameters"] < s["results"]["adamw"]["trainable_parameters"]

    md = (out / "results.md").read_text()
    for label in ("| BAdam |", "| AdamW |", "| LoRA r=8 (q,v) |", "random initialisation"):
        assert label in md
    assert "convergence.png" in proc.stdout


def test_missing_data_exits_cleanly(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "no such file" in proc.stderr
    assert not (tmp_path / "o").exists()
