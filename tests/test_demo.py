"""The CPU demo: both methods train on the same data, BAdam's loss falls, the report folder is complete."""

import json
from pathlib import Path

import pytest

from badam_hf.tools.demo import main, make_synthetic_records, run_demo

SHARED_ALPACA = Path(__file__).resolve().parents[2] / "shared/data/alpaca_en_demo.json"
TINY = dict(
    num_records=96,
    cutoff_len=96,
    vocab_size=300,
    batch_size=8,
    hidden_size=32,
    num_layers=2,
    switch_every=4,
    lr=3e-3,
    warmup_steps=2,
    window=4,
    verbose=False,
    threads=1,  # a tiny model gains nothing from more; one thread also suffers least on a busy machine
)


def _check_report(out: Path, summary: dict, steps: int):
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| BAdam |" in report and "| AdamW |" in report
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(summary))
    for method in ("badam", "adamw"):
        r = summary["results"][method]
        assert len(r["losses"]) == steps
        assert r["peak_rss_mb"] > 0 and r["optimizer_state_bytes"] > 0
    badam, adamw = summary["results"]["badam"], summary["results"]["adamw"]
    # Both start from the same weights and the same first batch, so the very first loss agrees.
    assert badam["losses"][0] == pytest.approx(adamw["losses"][0], rel=1e-5)
    # BAdam holds optimizer state for one block only.
    assert badam["optimizer_state_bytes"] < adamw["optimizer_state_bytes"]
    assert badam["final_loss"] < badam["first_loss"]


def test_synthetic_records_are_deterministic():
    a = make_synthetic_records(60, seed=1)
    assert a == make_synthetic_records(60, seed=1)
    assert a != make_synthetic_records(60, seed=2)
    assert all(set(r) == {"instruction", "input", "output"} for r in a)
    add = next(r for r in a if r["instruction"].startswith("Add "))
    x, y = (int(t.rstrip(".")) for t in add["instruction"].split()[1::2])
    assert add["output"] == f"{x} + {y} = {x + y}"


@pytest.mark.integration
def test_run_demo_tiny(tmp_path):
    steps = 16
    summary = run_demo(tmp_path / "rep", steps=steps, **TINY)
    _check_report(tmp_path / "rep", summary, steps)
    badam = summary["results"]["badam"]
    # descending over 2 layers + lm_head with K=4: every block gets its turn, in order, K steps each.
    assert summary["block_names"] == ["model.layers.0", "model.layers.1", "lm_head"]
    assert badam["active_blocks"] == [2] * 4 + [1] * 4 + [0] * 4 + [2] * 4
    assert summary["isolated"] is True


@pytest.mark.integration
@pytest.mark.skipif(not SHARED_ALPACA.exists(), reason=f"{SHARED_ALPACA} is absent")
def test_run_demo_on_real_alpaca(tmp_path, monkeypatch):
    # A relative --data path resolves against the current directory.
    monkeypatch.chdir(SHARED_ALPACA.parent)
    steps = 12
    settings = TINY | dict(vocab_size=800, cutoff_len=128)
    summary = run_demo(tmp_path / "rep", steps=steps, data_path=SHARED_ALPACA.name, max_records=128, isolate=False, **settings)
    assert summary["data"] == str(SHARED_ALPACA)
    # Records whose prompt alone fills the cutoff are left out; the rest train.
    assert summary["num_train_records"] + summary["num_dropped_records"] == 128
    assert summary["num_train_records"] >= 32
    _check_report(tmp_path / "rep", summary, steps)


def test_cli_rejects_missing_data(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--data", str(tmp_path / "nope.json")])
    assert "no such file" in capsys.readouterr().err


def test_the_demo_recipe_has_the_tiny_demos_settings():
    # recipes/demo.yaml is `badam-hf train demo`: the same model, data and BAdam settings as `--tiny`.
    import inspect

    from badam_hf.recipes import load_recipe

    d = {k: p.default for k, p in inspect.signature(run_demo).parameters.items()}
    r = load_recipe("demo")
    cfg = r.model["config"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (
        d["hidden_size"], 2 * d["hidden_size"], d["num_layers"])
    assert r.model["tokenizer_vocab_size"] == d["vocab_size"] and r.data["cutoff_len"] == d["cutoff_len"]
    assert r.data["dataset"] == "builtin:demo" and cfg["max_position_embeddings"] == max(d["cutoff_len"], 64)
    s = r.badam.schedule
    assert (s.switch_every, s.switch_mode, s.seed) == (d["switch_every"], d["switch_mode"], d["seed"])
    assert r.badam.partition.include_lm_head == d["include_lm_head"]
    t = r.training
    assert (t["learning_rate"], t["per_device_train_batch_size"], t["warmup_steps"], t["lr_scheduler_type"]) == (
        d["lr"], d["batch_size"], d["warmup_steps"], "cosine")


@pytest.mark.parametrize("argv,methods", [([], ("badam", "adamw")), (["--lora"], ("badam", "adamw", "lora")),
                                          (["--methods", "badam,adamw,lora"], ("badam", "adamw", "lora")),
                                          (["--methods", "adamw,badam", "--lora"], ("adamw", "badam", "lora"))])
def test_real_model_demo_runs_lora_only_when_asked(argv, methods, tmp_path, monkeypatch):
    from badam_hf.tools import finetune_demo

    seen = []
    monkeypatch.setattr(finetune_demo, "run_finetune_demo", lambda settings: seen.append(settings))
    assert main(["--out", str(tmp_path), *argv]) == 0
    assert seen[0].methods == methods and seen[0].out_dir == str(tmp_path)


@pytest.mark.parametrize("flag", [["--lora"], ["--methods", "badam,adamw"]])
def test_tiny_refuses_the_real_model_flags(flag, capsys):
    with pytest.raises(SystemExit):
        main(["--tiny", *flag])
    assert "belong to the real-model demo" in capsys.readouterr().err


def test_the_real_model_demos_defaults_visit_every_layer():
    # make demo's short run still trains each of SmolLM2's 30 layers (random order, K steps each).
    from badam_hf.tools.finetune_demo import DemoSettings

    s = DemoSettings()
    assert s.methods == ("badam", "adamw") and s.switch_mode == "random"
    assert s.steps >= 30 * s.switch_every and s.steps % s.eval_every == 0
