"""The real-model demo (`make demo`), scaled down: SmolLM2-135M-Instruct fine-tuned on dates in words with BAdam
and AdamW through the recipe code path; the report folder holds what README promises."""

from __future__ import annotations

import json

import pytest

from badam_hf import BAdamConfigError
from badam_hf.integrations import pretrained
from badam_hf.tools.finetune_demo import DemoSettings, run_finetune_demo

@pytest.mark.integration
def test_finetune_demo_small(smollm2_cache, tmp_path, monkeypatch):
    monkeypatch.setenv(pretrained.CACHE_ENV, str(smollm2_cache))
    out = tmp_path / "rep"
    s = DemoSettings(out_dir=str(out), methods=("badam", "adamw"), steps=4, switch_every=1, train_records=32,
                     held_out_records=8, eval_every=2, max_new_tokens=8, isolate=False, threads=2)
    summary = run_finetune_demo(s, verbose=False)
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(summary))
    assert "SmolLM2-135M-Instruct" in results["model"] and results["metric"].startswith("exact match")
    assert set(results["methods"]) == {"badam", "adamw"}
    for name, r in results["methods"].items():
        for key in ("eval_before", "eval_after", "held_out_loss_before", "held_out_loss_after", "train_seconds",
                    "peak_rss_gb", "optimizer_state_bytes"):
            assert key in r, (name, key)
        assert r["eval_before"] == 0.0  # the model echoes the date before fine-tuning
        assert r["held_out_loss_after"] < r["held_out_loss_before"], name  # 4 steps already teach the format
        assert [c[0] for c in r["held_out_curve"]] == [2, 4]
        assert len(r["train_losses"]) == 4 and r["train_seconds"] > 0
    badam, adamw = results["methods"]["badam"], results["methods"]["adamw"]
    assert badam["blocks_visited"] == 4 and badam["num_blocks"] == 30
    # K=1 drops each block's state inside the step that made it: the peak, right after the Adam update, is still
    # one layer's whole fp32 masters and two moments (12 bytes x 3,540,096 parameters) plus AdamW's step counters.
    layer = 12 * 3_540_096
    assert layer <= badam["optimizer_state_bytes"] <= layer + 1024
    assert badam["optimizer_state_bytes"] < adamw["optimizer_state_bytes"] / 10  # one layer of 30, embeddings frozen
    # Held-out and training dates are disjoint.
    train = {r["input"] for r in json.loads((out / "data" / "train.json").read_text())}
    held = {r["input"] for r in json.loads((out / "data" / "held_out.json").read_text())}
    assert train and held and not train & held
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| BAdam |" in report and "| AdamW |" in report and "expected `" in report


@pytest.mark.parametrize("kwargs,match", [(dict(methods=("badam",)), "must include badam and adamw"),
                                          (dict(methods=("badam", "sgd")), "choose from badam, adamw, lora"),
                                          (dict(steps=0), "steps=0")])
def test_bad_demo_settings_are_refused(kwargs, match):
    with pytest.raises(BAdamConfigError, match=match):
        DemoSettings(**kwargs)
