"""Shared fixtures: the real SmolLM2 model is loaded once per test session."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M model handle (converted to safetensors on first use)."""
    from kvpolicy.models import load_model

    return load_model("smollm2-135m")
