"""`badam-hf train --check` looks for the recipe's model and data (no download, no network), the real run
turns a failed model load into one line, and a repeated override key is refused."""

from __future__ import annotations

import json

import pytest
import yaml

from badam_hf.recipes import RecipeError, apply_overrides, build_parts, check_inputs, load_recipe
from badam_hf.tools.cli import main

HUB_NAME = "some-org/some-model"


def write_recipe(folder, model: dict | None = None, data: dict | None = None):
    recipe = {
        "model": model or {"name_or_path": "./weights", "dtype": "float32"},
        "data": {"dataset": "builtin:demo", "format": "alpaca", **(data or {})},
        "training": {"output_dir": str(folder / "out"), "max_steps": 1, "use_cpu": True, "report_to": "none"},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A working folder (relative paths resolve in it) with an empty hub cache of its own, online."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return tmp_path


def check(path, *overrides, capsys):
    code = main(["train", "--check", str(path), *overrides])
    out, err = capsys.readouterr()
    return code, out, err


def fake_cached_model(cache, name: str) -> None:
    """The hub cache layout huggingface_hub writes: refs/main names a snapshot holding config.json."""
    repo = cache / f"models--{name.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text("{}")


@pytest.mark.parametrize("value", ["./weights", "../weights", "~/no-such-badam-model", "a/b/c", "/no/such/model"])
def test_check_reports_a_missing_local_model_folder(here, capsys, value):
    code, out, err = check(write_recipe(here), f"model.name_or_path={value}", capsys=capsys)
    assert code == 2 and "valid" not in out
    assert f"model.name_or_path={value!r}: no such folder" in err


def test_check_reports_a_model_folder_without_config(here, capsys):
    (here / "weights").mkdir()
    code, out, err = check(write_recipe(here), capsys=capsys)
    assert code == 2 and "is a folder without config.json" in err
    (here / "weights" / "config.json").write_text("{}")
    assert check(write_recipe(here), capsys=capsys)[0] == 0


@pytest.mark.parametrize("key,value", [("dataset", "missing.json"), ("dataset", "./data/train"),
                                       ("dataset", "~/no-such-badam-data.jsonl"), ("eval_dataset", "eval.jsonl")])
def test_check_reports_a_missing_data_file(here, capsys, key, value):
    (here / "weights").mkdir()
    (here / "weights" / "config.json").write_text("{}")
    code, out, err = check(write_recipe(here), f"data.{key}={value}", capsys=capsys)
    assert code == 2
    assert f"data.{key}={value!r}: no such file" in err


def test_check_accepts_existing_data_and_a_split_name(here, capsys):
    (here / "weights").mkdir()
    (here / "weights" / "config.json").write_text("{}")
    (here / "train.json").write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}]))
    code, out, err = check(write_recipe(here, data={"dataset": "train.json", "eval_dataset": "validation"}), capsys=capsys)
    assert (code, err) == (0, "") and "note" not in out


def test_check_says_an_uncached_hub_model_will_be_downloaded(here, capsys):
    path = write_recipe(here, model={"name_or_path": HUB_NAME})
    code, out, err = check(path, capsys=capsys)
    assert code == 0 and err == ""
    assert f"note: model.name_or_path={HUB_NAME!r} is not a local folder nor in the Hugging Face cache" in out
    assert "will be downloaded from the hub" in out
    # Once in the cache (looked up offline), nothing is said.
    fake_cached_model(here / "hub", HUB_NAME)
    code, out, err = check(path, capsys=capsys)
    assert code == 0 and "note" not in out


def test_check_refuses_an_uncached_hub_model_offline(here, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_recipe(here, model={"name_or_path": HUB_NAME})
    code, out, err = check(path, capsys=capsys)
    assert code == 2
    assert f"model.name_or_path={HUB_NAME!r} is not a local folder and not in the Hugging Face cache" in err
    assert "HF_HUB_OFFLINE=1" in err
    fake_cached_model(here / "hub", HUB_NAME)
    assert check(path, capsys=capsys)[0] == 0


def test_check_inputs_notes_a_hub_dataset(here):
    (here / "weights").mkdir()
    (here / "weights" / "config.json").write_text("{}")
    problems, notes = check_inputs(load_recipe(write_recipe(here, data={"dataset": "org/data"})))
    assert problems == [] and len(notes) == 1 and "data.dataset='org/data' is a hub dataset" in notes[0]


def test_the_run_refuses_a_missing_model_folder_in_one_line(here, capsys):
    code = main(["train", str(write_recipe(here))])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and "model.name_or_path='./weights': no such folder" in err


def test_a_failed_model_load_is_one_recipe_error_line(here, capsys):
    (here / "weights").mkdir()
    (here / "weights" / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    # A tokenizer trained on the data, so the failure is the model's own (its unknown architecture).
    recipe = load_recipe(write_recipe(here, model={"name_or_path": "./weights", "tokenizer": "local", "dtype": "float32"}))
    with pytest.raises(RecipeError) as info:
        build_parts(recipe)
    e = info.value
    assert e.__cause__ is None and e.__suppress_context__  # no chained traceback
    assert "\n" not in str(e) and len(e.problems) == 1
    assert "model.name_or_path='./weights' could not be loaded: " in str(e) and "no-such-architecture" in str(e)

    code = main(["train", str(recipe.path)])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and err.startswith("badam-hf train: ") and "could not be loaded" in err


def test_a_repeated_override_key_is_refused():
    with pytest.raises(RecipeError, match=r"override key training\.max_steps is given twice "
                                          r"\('training\.max_steps=3' and 'training\.max_steps=4'\)"):
        apply_overrides({"training": {}}, ["training.max_steps=3", "training.learning_rate=1e-3",
                                           "training.max_steps=4"])
    # Different keys (also in the same section) are fine, and the value is the one given.
    assert apply_overrides({}, ["training.max_steps=3", "training.save_steps=4"]) == {
        "training": {"max_steps": 3, "save_steps": 4}}


def test_check_refuses_a_repeated_override_key(capsys):
    # Overrides after --check are overrides too (argparse alone would call them unrecognized).
    code = main(["train", "demo", "--check", "training.max_steps=3", "training.max_steps=4"])
    out, err = capsys.readouterr()
    assert code == 2 and "training.max_steps is given twice" in err and "valid" not in out
