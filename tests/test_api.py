"""The Python API at the package top level, and the README's Python example run exactly as written."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

import kvpolicy

README = Path(__file__).parents[1] / "README.md"


def test_the_top_level_names_resolve():
    assert {"load_model", "load_policy", "make_scorer", "Budget", "generate", "KVPolicyPress"} <= set(kvpolicy.__all__)
    for name in kvpolicy.__all__:
        assert getattr(kvpolicy, name) is not None
    with pytest.raises(AttributeError):
        kvpolicy.no_such_name  # noqa: B018
    assert set(kvpolicy.__all__) <= set(dir(kvpolicy))  # completion finds them before their first use


def readme_python() -> str:
    """The README's one ```python block."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1, "the README has one Python example"
    return blocks[0]


@pytest.mark.model
def test_the_readme_example_runs_as_written(smollm):
    """With the policy bundled for SmolLM2: what a user gets right after install."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_python(), "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    # the engine's answer with its cache, kvpress's, the batch's two, transformers' generate on an EvictingCache
    assert len(lines) == 5 and "cache" in lines[0] and all(line.strip() for line in lines), lines
    assert lines[0].startswith(lines[2]), lines  # a row of the batch answers as the prompt alone
    full, compressed = (int(n.replace(",", "")) for n in re.findall(r"([\d,]+) -> ([\d,]+) bytes", lines[0])[0])
    assert compressed < full / 4
