"""`python -m badam_hf.run SCRIPT ...`: an unmodified HF script gets `--optim badam`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from badam_hf import run

SCRIPTS = Path(__file__).parent / "scripts"
SCRIPT = SCRIPTS / "train_clm.py"
COMMON = [
    "--max_steps", "6", "--use_cpu", "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no",
    "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--disable_tqdm", "true",
]


def _run(args, cwd=None):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def _layer_params(params, i):
    return {n for n in params if n.startswith(f"model.layers.{i}.")}


@pytest.mark.integration
def test_stock_script_trains_with_badam_through_the_launcher(tmp_path):
    out = tmp_path / "out"
    proc = _run(["-m", "badam_hf.run", str(SCRIPT), "--output_dir", str(out), "--optim", "badam",
                 "--optim_args", "switch_every=2,switch_mode=ascending", *COMMON])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["optimizer"] == "BlockOptimizer"
    steps = [h for h in result["log_history"] if "loss" in h]
    assert [h["badam/active_block"] for h in steps] == [0, 0, 1, 1, 2, 2]
    assert steps[0]["badam/active_block_name"] == "model.layers.0"
    # Blocks 0-2 were visited; layer 3, embeddings, final norm and LM head stayed bit-identical.
    params = result["params"]
    assert set(result["changed"]) == _layer_params(params, 0) | _layer_params(params, 1) | _layer_params(params, 2)


@pytest.mark.integration
def test_stock_script_without_the_launcher_rejects_optim_badam(tmp_path):
    out = tmp_path / "out"
    proc = _run([str(SCRIPT), "--output_dir", str(out), "--optim", "badam", *COMMON])
    assert proc.returncode == 2
    assert "invalid choice: 'badam'" in proc.stderr
    assert not out.exists()


@pytest.mark.integration
def test_module_form_rejects_bad_optim_args_before_training(tmp_path):
    # `-m MODULE` form, run from the scripts folder as `python -m train_clm` would be.
    out = tmp_path / "out"
    proc = _run(["-m", "badam_hf.run", "-m", "train_clm", "--output_dir", str(out), "--optim", "badam",
                 "--optim_args", "switch_mode=bogus", *COMMON], cwd=SCRIPTS)
    assert proc.returncode != 0
    assert "BAdamConfigError: switch_mode='bogus' is not valid" in proc.stderr
    assert "invalid choice" not in proc.stderr  # the launcher did register --optim badam
    assert not out.exists()  # nothing written: no model built, no checkpoint


@pytest.mark.integration
def test_one_import_line_variant_in_process(tmp_path, monkeypatch):
    # badam_hf is already imported in this process; the variant script shows the one-line usage.
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "argv", sys.argv[:])
    code = run.main([str(SCRIPTS / "train_clm_import.py"), "--output_dir", str(out), "--optim", "badam",
                     "--optim_args", "switch_every=3,switch_mode=descending", *COMMON])
    assert code == 0
    assert sys.argv[0] == str(SCRIPTS / "train_clm_import.py")
    assert sys.path[0] == str(SCRIPTS)
    result = json.loads((out / "result.json").read_text())
    assert result["optimizer"] == "BlockOptimizer"
    params = result["params"]
    assert set(result["changed"]) == _layer_params(params, 3) | _layer_params(params, 2)


def test_usage_errors(capsys, tmp_path):
    assert run.main([]) == 2
    assert "usage: python -m badam_hf.run SCRIPT.py" in capsys.readouterr().err
    assert run.main(["-m"]) == 2
    assert run.main([str(tmp_path / "missing.py")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert run.main(["--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def test_script_exit_code_propagates(tmp_path, monkeypatch):
    script = tmp_path / "exits.py"
    script.write_text("import sys\nassert __name__ == '__main__'\nsys.exit(sys.argv[1])\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "argv", sys.argv[:])
    with pytest.raises(SystemExit) as e:
        run.main([str(script), "3"])
    assert e.value.code == "3"
