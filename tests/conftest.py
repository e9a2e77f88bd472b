"""Fixtures shared by the whole suite: the tiny-model builders of tests/tiny_models.py.

Each fixture returns the builder itself, so a test builds as many models as it needs, with the arguments it
needs: `def test_x(tiny_llama): model = tiny_llama(layers=2, dtype=torch.bfloat16)`. `tiny_model` takes the
family first, for tests parametrized over architectures: `tiny_model("gpt2", layers=3)`. The arguments are
documented in tests/tiny_models.py (which the subprocess workers import directly).
"""

from __future__ import annotations

import pytest
import tiny_models


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_models.tiny_llama


@pytest.fixture(scope="session")
def tiny_qwen2():
    return tiny_models.tiny_qwen2


@pytest.fixture(scope="session")
def tiny_gpt2():
    return tiny_models.tiny_gpt2


@pytest.fixture(scope="session")
def tiny_roberta():
    return tiny_models.tiny_roberta


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_models.tiny_model


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """A badam_hf cache folder with SmolLM2-135M-Instruct prepared in it, once per test session, through the
    first-use path recipes take (`resolve_model`); point $BADAM_HF_CACHE at it to use it."""
    from badam_hf.integrations import pretrained

    root = tmp_path_factory.mktemp("badam_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv(pretrained.CACHE_ENV, str(root))
    try:
        folder = pretrained.resolve_model("smollm2-135m-instruct")
    finally:
        mp.undo()
    assert folder == str(root / "models" / "smollm2-135m-instruct")
    return root
