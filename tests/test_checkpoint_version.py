"""The optimizer state's format version is read: only the current one loads; an older, newer, missing or
malformed version is refused with a CheckpointMismatchError naming both versions, before anything changes."""

from __future__ import annotations

import pytest
import torch

from badam_hf.core import BlockOptimizer, CheckpointMismatchError
from badam_hf.core.checkpoint import STATE_VERSION
from tiny_models import VOCAB


def saved_pair(tiny_llama, tmp_path):
    """A bf16 optimizer two steps into its first block (so it has masters and moments), its state read back
    from disk, and a fresh optimizer on a copy of the model to load it into."""
    model = tiny_llama(dtype=torch.bfloat16)
    opt = BlockOptimizer(model, lr=1e-2, switch_every=3, switch_mode="ascending")
    for seed in range(2):
        ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    sd = torch.load(tmp_path / "opt.pt", weights_only=True)
    model2 = tiny_llama(dtype=torch.bfloat16)
    model2.load_state_dict(model.state_dict())
    return opt, sd, model2, BlockOptimizer(model2, lr=1e-2, switch_every=3, switch_mode="ascending")


def test_the_current_version_is_written_and_loads(tiny_llama, tmp_path):
    opt, sd, _, other = saved_pair(tiny_llama, tmp_path)
    assert sd["badam"]["version"] == STATE_VERSION == 1
    other.load_state_dict(sd)
    assert other.global_step == opt.global_step == 2 and other.loaded_step == 2
    assert other.masters.keys() == opt.masters.keys()
    assert all(torch.equal(other.masters[n], m) for n, m in opt.masters.items())


@pytest.mark.parametrize("version,words", [
    (STATE_VERSION + 1, rf"format version {STATE_VERSION + 1}, but this badam_hf reads version {STATE_VERSION}.*"
                        r"saved by a newer badam_hf"),
    (STATE_VERSION - 1, rf"format version {STATE_VERSION - 1}, but this badam_hf reads version {STATE_VERSION}.*"
                        r"saved by an older badam_hf"),
    (None, rf"no format version \(this badam_hf reads version {STATE_VERSION}\)"),
    ("1", rf"format version '1', not an integer \(this badam_hf reads version {STATE_VERSION}\)"),
    (True, r"format version True, not an integer"),
])
def test_another_version_is_refused_and_changes_nothing(tiny_llama, tmp_path, version, words):
    _, sd, model2, other = saved_pair(tiny_llama, tmp_path)
    if version is None:
        del sd["badam"]["version"]
    else:
        sd["badam"]["version"] = version
    weights = {n: p.clone() for n, p in model2.named_parameters()}
    with pytest.raises(CheckpointMismatchError, match=words):
        other.check_state_dict(sd)
    with pytest.raises(CheckpointMismatchError, match=words):
        other.load_state_dict(sd)
    assert other.global_step == 0 and other.loaded_step is None and not other.inner.state
    assert all(torch.equal(p, weights[n]) for n, p in model2.named_parameters())


def test_the_version_is_checked_before_the_fields_it_describes(tiny_llama, tmp_path):
    """A newer format may have renamed or dropped fields: the refusal names the version, not a missing key."""
    _, sd, _, other = saved_pair(tiny_llama, tmp_path)
    sd["badam"] = {"version": STATE_VERSION + 1, "step": 2}
    with pytest.raises(CheckpointMismatchError, match=f"format version {STATE_VERSION + 1}"):
        other.load_state_dict(sd)
