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


def _specs() -> dict[str, str]:
    """Distribution -> its version specifier in pyproject.toml (dependencies and extras)."""
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


def _clauses(spec: str) -> list[tuple[str, str]]:
    return [re.fullmatch(r"(>=|<=|==|!=|~=|<|>)([0-9][0-9a-z.*]*)", c).groups() for c in spec.split(",") if c]


def test_pyproject_has_lower_bounds_only_and_they_hold_the_installed_versions():
    """A plugin must not block the releases a user's other packages bring: a lower bound, exclusions of broken
    releases (!=), and nothing that caps a future release."""
    specs = _specs()
    assert set(specs) == set(PINNED)
    for dist, spec in specs.items():
        ops = [op for op, _ in _clauses(spec)]
        assert ops.count(">=") == 1, f"{dist}{spec} needs exactly one lower bound (>=)"
        assert set(ops) <= {">=", "!="}, f"{dist}{spec}: only a lower bound and != exclusions; no cap"
        lower = dict(_clauses(spec))[">="]
        installed = importlib.metadata.version(dist)
        assert _version(lower) <= _version(installed), (dist, spec, installed)
        excluded = [v for op, v in _clauses(spec) if op == "!="]
        assert installed not in excluded, (dist, spec, installed)
        # The tested range starts at the lower bound (the oldest end `make compat` builds).
        assert re.search(rf"\b{dist} {re.escape(lower)}-", patches.TESTED_VERSIONS), (dist, lower)
    # The error message's supported ranges are pyproject's.
    assert patches.SUPPORTED == tuple(f"{d}{specs[d]}" for d in ("transformers", "accelerate"))
    # Its install hint names the newest tested release of each.
    for hint in patches.NEWEST_TESTED:
        dist, version = re.fullmatch(r"([a-z]+)==([0-9.]+)\.\*", hint).groups()
        assert re.search(rf"\b{dist} [0-9.]+-{re.escape(version)}\b", patches.TESTED_VERSIONS), hint


def test_the_policy_check_rejects_a_cap():
    # The parser the policy test relies on sees every kind of cap.
    assert [op for op, _ in _clauses(">=5.18,<5.25")] == [">=", "<"]
    assert [op for op, _ in _clauses("==5.24.*")] == ["=="]
    assert [op for op, _ in _clauses(">=5.18,!=5.20.0")] == [">=", "!="]
