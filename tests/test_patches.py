"""Every change badam_hf makes to transformers and accelerate (`integrations/patches.py`) is in place after
`import badam_hf`; a missing target is an error naming it and the tested versions, never a silent skip; an
optional engine's missing target refuses that engine only; pyproject.toml pins the tested ranges."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import badam_hf
from badam_hf import BlockOptimizer, UnsupportedVersionError
from badam_hf.integrations import patches

ROOT = Path(__file__).resolve().parents[1]
PINNED = ("transformers", "accelerate", "trl", "peft")


@pytest.fixture
def missing(monkeypatch):
    """`missing(target)` deletes the target's attribute; afterwards it is restored and the patches re-installed
    (so the module's record of unavailable engines is clean for the next test)."""

    def remove(target):
        owner, name, _ = patches.lookup(target)
        monkeypatch.delattr(owner, name)

    yield remove
    monkeypatch.undo()
    patches.install()


def test_every_target_exists_and_is_patched_after_import():
    from transformers.training_args import OptimizerNames

    assert badam_hf.__name__ == "badam_hf"
    assert len(patches.TARGETS) == 12  # the 11 changes and the DynamoBackend enum that one of them reads
    for target in patches.TARGETS:
        patches.lookup(target)  # raises when missing
    for target in patches.WRAPPED:
        fn = patches.lookup(target)[2]
        assert getattr(fn, "_badam_wrapped", False) is True, target.name
        assert not getattr(fn.__wrapped__, "_badam_wrapped", False), f"{target.name} is wrapped twice"
    member = OptimizerNames("badam")
    assert member is OptimizerNames.BADAM and "badam" in [m.value for m in OptimizerNames]
    assert patches.lookup(patches.HANDLERS)[2][member] is patches._badam_handler
    assert patches._unavailable == {}


def test_install_is_idempotent():
    before = {t.name: patches.lookup(t)[2] for t in patches.TARGETS}
    patches.install()
    assert {t.name: patches.lookup(t)[2] for t in patches.TARGETS} == before


REQUIRED = [t for t in patches.TARGETS if t.engine is None]


@pytest.mark.parametrize("target", REQUIRED, ids=[t.name for t in REQUIRED])
def test_a_missing_target_raises_naming_it_and_the_tested_versions(target, missing):
    missing(target)
    with pytest.raises(UnsupportedVersionError) as info:
        patches.install()
    message = str(info.value)
    assert f"{target.name}" in message or f"{target.module}.{target.attrs[0]}" in message
    assert patches.TESTED_VERSIONS in message and "pip install" in message


def test_missing_enum_internals_raise():
    class Plain:  # an "enum" without the internals `_add_enum_member` writes
        _member_map_ = {}

    with pytest.raises(UnsupportedVersionError, match="_value2member_map_"):
        patches._add_enum_member(Plain, "BADAM", "badam")


def test_a_missing_fsdp2_target_refuses_fsdp2_only(missing, monkeypatch, tiny_llama):
    target = next(t for t in patches.FSDP_IO if t.module == "accelerate.accelerator" and "save" in t.name)
    missing(target)
    patches.install()  # the import does not fail
    assert list(patches._unavailable) == ["FSDP2"]
    patches.require_engine(None)
    patches.require_engine("DeepSpeed")
    with pytest.raises(UnsupportedVersionError, match=r"under FSDP2.*accelerate\.accelerator\.save_fsdp_optimizer"):
        patches.require_engine("FSDP2")
    BlockOptimizer(tiny_llama(), lr=1e-3)  # one process, no engine: trains
    monkeypatch.setattr(patches, "engine_from_environment", lambda: "FSDP2")  # as under `accelerate launch`
    with pytest.raises(UnsupportedVersionError, match="save_fsdp_optimizer"):
        BlockOptimizer(tiny_llama(), lr=1e-3)


def test_a_missing_deepspeed_target_refuses_deepspeed_arguments(missing, tmp_path):
    from transformers import TrainingArguments

    missing(patches.DEEPSPEED_LOAD)
    patches.install()
    assert list(patches._unavailable) == ["DeepSpeed"]
    TrainingArguments(str(tmp_path), optim="badam", report_to="none")  # no engine: accepted
    with pytest.raises(UnsupportedVersionError, match="deepspeed_load_checkpoint"):
        TrainingArguments(str(tmp_path), optim="badam", report_to="none",
                          deepspeed={"zero_optimization": {"stage": 3}})


def test_import_fails_loudly_when_a_target_is_gone():
    # A fresh interpreter, as after an upgrade of accelerate that renamed the clipping method.
    code = "import accelerate.accelerator as a; del a.Accelerator.clip_grad_norm_; import badam_hf"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("badam_hf.core.errors.UnsupportedVersionError: badam_hf cannot patch "
                           "accelerate.accelerator.Accelerator.clip_grad_norm_"), proc.stderr[-2000:]
    assert patches.TESTED_VERSIONS in last


def _pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + [s for v in project["optional-dependencies"].values() for s in v]
    found = {}
    for spec in specs:
        m = re.match(r"([A-Za-z0-9_.-]+)(.*)", spec)
        if m.group(1).lower() in PINNED:
            found[m.group(1).lower()] = m.group(2).replace(" ", "")
    return found


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.match(r"[0-9]+(?:\.[0-9]+)*", text).group(0).split("."))


def test_pyproject_pins_tested_ranges_that_hold_the_installed_versions():
    pins = _pins()
    assert set(pins) == set(PINNED)
    for dist, spec in pins.items():
        bounds = dict(re.findall(r"(>=|<)([0-9.]+)", spec))
        assert set(bounds) == {">=", "<"}, f"{dist}{spec} needs a lower and an upper bound"
        installed = _version(importlib.metadata.version(dist))
        assert _version(bounds[">="]) <= installed < _version(bounds["<"]), (dist, spec, installed)
        # The error message names the same tested range, from its lower bound.
        assert re.search(rf"\b{dist} {re.escape(bounds['>='])}\b", patches.TESTED_VERSIONS), dist
    # The install hint in the error message is the pin itself.
    for pin in patches.PINS:
        dist = re.match(r"[a-z]+", pin).group(0)
        assert pin == dist + pins[dist]
