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
