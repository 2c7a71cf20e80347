"""Shared fixtures: the real SmolLM2 model is loaded once per test session (per worker under `pytest -n`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# under `pytest -n N` (the Makefile's two workers) each worker computes with one thread, so the workers never
# oversubscribe the cores; alone, two threads
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M model handle (converted to safetensors on first use)."""
    from kvpolicy.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma():
    """The embedded Gemma 3 270M handle, fp32 (a hybrid model: sliding-window and full-attention layers)."""
    from kvpolicy.models import load_model

    return load_model("gemma3-270m", "cpu", "float32")


@pytest.fixture(scope="session")
def trained_policy(smollm, tmp_path_factory):
    """A KVP policy trained briefly on 3 real SmolLM2 traces (short prompts and futures to stay fast)."""
    from kvpolicy.cli import main

    root = tmp_path_factory.mktemp("kvp")
    traces, out = root / "traces", root / "ckpt"
    assert main(["traces", "--source", "ruler", "--n", "3", "--context", "160", "--future-tokens", "8",
                 "--baselines", "none", "--out", str(traces)]) == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--traces", str(traces), "--out", str(out), "--steps", "12", "--batch", "4",
                     "--tokens", "64", "--hidden", "16", "--val-every", "6", "--warmup", "3", "--no-compile"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture
def one_thread():
    """For tests of tiny policy networks: one thread is fastest, and immune to a busy machine's thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def as_nobody():
    """A context manager that runs its block with the effective uid of `nobody`: the tests run as root, and root
    ignores permission bits, an ordinary user does not."""

    @contextlib.contextmanager
    def switch():
        if os.geteuid() != 0:
            yield
            return
        os.seteuid(65534)
        try:
            yield
        finally:
            os.seteuid(0)

    return switch


@pytest.fixture
def public_tmp():
    """A temporary directory that `nobody` can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="kvp-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with real-model tests run first (the order within and among the others kept): under `pytest -n` the
    workers start on the long files and the short ones fill their ends, instead of one long file running alone last."""
    heavy = {item.path for item in items if item.get_closest_marker("model")}
    items.sort(key=lambda item: item.path not in heavy)
