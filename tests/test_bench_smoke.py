"""Smoke test of benchmarks/bench.py at --shape tiny: it runs end to end and its byte counts are right.

No timing assertions: only that times were measured (positive) and that the byte counts follow from the
tensors BAdam must hold (fp32 master + two Adam moments = 12 bytes per active-block parameter). The report
(results.md) states the paper's expectations beside the measurements; the judgements are made here.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def _bench_module():
    """benchmarks/bench.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_under_test", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up while the file runs
    spec.loader.exec_module(bench)
    return bench


def test_the_method_table():
    """Which methods are timed over whole block-epochs, and which count as one layer at a time."""
    bench = _bench_module()
    specs = bench.METHOD_SPECS
    assert bench.METHODS == ("badam", "adamw", "lora", "reference", "badam_k100", "reference_k100", "badam_ratio",
                             "badam_lisa", "badam_bread", "badam_nearest", "reference_k4", "badam_k4",
                             "badam_k4_nearest")
    assert {m for m, s in specs.items() if s.block_epoch_aligned} == {"badam", "reference", "badam_bread",
                                                                      "badam_nearest"}
    assert {m for m, s in specs.items() if s.layerwise} == {"badam", "reference", "badam_k100", "reference_k100",
                                                            "badam_bread", "badam_nearest", "reference_k4",
                                                            "badam_k4", "badam_k4_nearest"}
    # `--methods rounding`: the default against nearest and the authors', at K=1 and K=4
    assert [specs[m].switch_every for m in bench.GROUPS["rounding"].split(",")] == [1, 1, 1, 4, 4, 4]
    assert specs["badam_nearest"].block_settings["switch_rounding"] == "nearest"
    assert specs["badam_k100"].switch_every == specs["reference_k100"].switch_every == 100
    assert {s.optimizer for s in specs.values()} == {"block", "adamw", "lora", "reference"}


def test_rounds_merge_every_rounds_steps_and_the_step_table_shows_each_round():
    """--rounds: a method's times are the mean and median over all rounds' timed steps; its memory readings are
    the first round's; the step table lists default / nearest of each round's means."""
    bench = _bench_module()

    def run(opt: list[float], marker: int) -> dict:
        n = len(opt)
        return {"memory": {"peak_bytes": marker}, "loadavg_1min_before_after": [0.1 * marker, 0.2 * marker],
                "time": {"per_step_forward_s": [1.0] * n, "per_step_backward_s": [2.0] * n,
                         "per_step_optimizer_s": opt, "optimizer_s": sum(opt) / n, "step_s": 3.0 + sum(opt) / n,
                         "tokens_per_s": 100.0, "wall_s": 5.0}}

    ours = bench.merge_rounds([run([0.1, 0.3], 1), run([0.2, 0.6], 2)])
    assert ours["memory"]["peak_bytes"] == 1 and ours["rounds"] == 2 and ours["steps"] == 4
    t = ours["time"]
    assert t["per_step_optimizer_s"] == [0.1, 0.3, 0.2, 0.6]
    assert t["optimizer_s"] == pytest.approx(0.3) and t["median_optimizer_s"] == pytest.approx(0.25)
    assert t["round_optimizer_s"] == [pytest.approx(0.2), pytest.approx(0.4)]
    assert t["step_s"] == pytest.approx(3.3) and t["wall_s"] == 10.0
    assert t["tokens_per_s"] == pytest.approx(100.0 * 3.2 / 3.3)
    assert ours["loadavg_1min_before_after"] == [pytest.approx(0.1), pytest.approx(0.4)]
    near = bench.merge_rounds([run([0.1, 0.1], 1), run([0.2, 0.2], 1)])
    assert bench.merge_rounds([run([0.1], 1)])["time"].get("round_optimizer_s") is None  # one round: as measured
    table = "\n".join(bench.step_table({"badam": ours, "badam_nearest": near}))
    assert "| 1 | - | 0.3000 (0.2500) | 0.1500 (0.1500) | - | 2.00 | 2.00, 2.00 |" in table


@pytest.mark.integration  # runs the benchmark script end to end in a subprocess
def test_bench_tiny(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--shape", "tiny", "--steps", "2", "--methods",
         "badam,adamw,lora,badam_k100,badam_ratio,badam_lisa,badam_bread",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = results["methods"]
    assert set(rows) == {"badam", "adamw", "lora", "badam_k100", "badam_ratio", "badam_lisa", "badam_bread"}
    for name, r in rows.items():
        assert r["steps"] == 2
        for key in ("forward_s", "backward_s", "optimizer_s", "step_s", "tokens_per_s"):
            assert r["time"][key] > 0, (name, key)
        b = r["bytes"]
        for key in ("weights", "grads", "moments", "updated_numel"):
            assert b[key] > 0, (name, key)
        assert r["memory"]["peak_bytes"] > 0, name
        assert len(r["losses"]) == 2 and all(l > 0 for l in r["losses"])

    # BAdam: one Llama layer is active; its fp32 masters + Adam moments are exactly 12 bytes per parameter,
    # its fp32 grads 4 bytes per parameter, and its own memory_bytes() agrees with the independent count.
    badam, adamw, lora = rows["badam"]["bytes"], rows["adamw"]["bytes"], rows["lora"]["bytes"]
    n = badam["updated_numel"]
    hidden, inter, heads, kv = 64, 128, 4, 2  # the tiny shape
    head_dim = hidden // heads
    layer_numel = 2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * inter + 2 * hidden
    assert n == layer_numel
    assert badam["masters"] + badam["moments"] == 12 * n
    assert badam["grads"] == 4 * n
    assert sum(badam["own_memory_bytes"].values()) == badam["grads"] + badam["masters"] + badam["moments"] + badam[
        "step_scalars"]
    assert badam["masters"] + badam["moments"] < adamw["masters"] + adamw["moments"]
    # AdamW trains every (fp32) parameter: 8 bytes of moments and 4 of grad per parameter.
    total = rows["adamw"]["total_params"]
    assert adamw["updated_numel"] == total and adamw["moments"] == 8 * total and adamw["grads"] == 4 * total
    # LoRA r=8 on q_proj and v_proj of 4 layers: A (r x in) + B (out x r) per adapted matrix.
    assert lora["updated_numel"] == 4 * (8 * hidden + hidden * 8 + 8 * hidden + kv * head_dim * 8)

    # The live-tensor accounting: every phase measured; BAdam's live peak is the weights, 16 bytes per active
    # parameter at most and the activations; at K=1 its masters are made at the step (none in forward/backward).
    for name in ("badam", "badam_k100"):
        live = rows[name]["live"]
        assert {"forward", "backward", "inner step"} <= set(live["phases_above_weights"])
        assert live["weights_bytes"] == badam["weights"]
        assert live["peak_bytes"] <= live["weights_bytes"] + 16 * n + live["activations_bytes"]
    k1, k100 = rows["badam"]["live"]["phases_above_weights"], rows["badam_k100"]["live"]["phases_above_weights"]
    assert k1["forward"] < k100["forward"]  # K=100 carries the block's master and moments through its forward

    # The block family: 16 bytes per trained entry for each (ratio: 5% of each layer matrix; LISA: two layers
    # plus embeddings, final norm and head; BREAD: BAdam's one layer, its inactive step keeps no state).
    embed = 512 * hidden  # the tiny shape's vocabulary x hidden, for the input embedding and the (untied) head
    expected = {"badam_ratio": sum(int(0.05 * p.numel()) for p in _layer_params(hidden, inter, heads, kv)) * 4,
                "badam_lisa": 2 * layer_numel + 2 * embed + hidden, "badam_bread": layer_numel}
    for name, numel in expected.items():
        b = rows[name]["bytes"]
        assert b["updated_numel"] == numel, name
        assert b["masters"] + b["moments"] + b["grads"] == 16 * numel, name
        assert sum(b["own_memory_bytes"].values()) == 16 * numel + b["step_scalars"], name

    assert "ratios_to_adamw" in rows["badam"]
    md = (out / "results.md").read_text()
    assert "| BAdam (badam_hf) |" in md and "D(D+1)/(2D^2)" in md and "Live tensor bytes by phase" in md
    assert (out / "memory_time.png").stat().st_size > 0


def _layer_params(hidden, inter, heads, kv):
    import torch

    head_dim = hidden // heads
    shapes = [(hidden, hidden), (kv * head_dim, hidden), (kv * head_dim, hidden), (hidden, hidden),
              (inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    return [torch.empty(s) for s in shapes]


@pytest.mark.integration  # a subprocess
def test_gpu_shape_refused_on_cpu(tmp_path):
    """--shape llama3-8b on the CPU (--cpu forces it even on a GPU machine) fails at once with a message,
    instead of allocating 16 GB of weights and running for hours."""
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--shape", "llama3-8b", "--cpu", "--out", str(tmp_path / "results")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "--shape llama3-8b needs a CUDA GPU" in proc.stderr
    assert not (tmp_path / "results").exists()
