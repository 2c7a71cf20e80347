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


@pytest.fixture
def one_thread():
    """For tests of tiny policy networks: one thread is fastest, and immune to a busy machine's thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
