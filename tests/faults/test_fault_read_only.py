"""A read-only output is refused before any work, in one line, by every command that writes (the kill-and-resume
tests are tests/faults/test_killed_*.py)."""

from __future__ import annotations

import importlib

import pytest

from kvpolicy.training.synthetic import SyntheticTraces, write_synthetic_traces


@pytest.fixture
def read_only_dir(public_tmp):
    """Synthetic traces and an empty results file beside a directory `ro` that nobody may write into."""
    write_synthetic_traces(public_tmp / "traces", SyntheticTraces(4, length=64, n_layers=2, n_kv_heads=2, head_dim=16))
    (public_tmp / "results.jsonl").write_text("")
    (public_tmp / "ro").mkdir(mode=0o555)
    return public_tmp


@pytest.mark.parametrize("command", [
    ["traces", "--source", "ruler", "--n", "2", "--context", "64", "--out", "{ro}/traces"],
    ["train", "--traces", "{dir}/traces", "--out", "{ro}/ckpt", "--steps", "2", "--no-compile"],
    ["sweep", "--out", "{ro}/results.jsonl", "--task", "traces:{dir}/traces", "--scorer", "knorm"],
    ["report", "{dir}/results.jsonl", "--out", "{ro}/report"],
])
def test_a_read_only_output_directory_fails_fast_in_one_line(read_only_dir, as_nobody, command, capsys, monkeypatch):
    from kvpolicy import cli
    from kvpolicy.models import loader

    for module in ("traces.cli", "train_cli", "sweep_cli", "report.cli"):  # as root: nobody cannot read the stdlib
        importlib.import_module(f"kvpolicy.{module}")
    for module in ("traces.pipeline", "training.trainer", "distributed", "evaluation.sweep", "report.render",
                   "report.summary", "traces.store"):
        importlib.import_module(f"kvpolicy.{module}")
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    argv = [a.format(dir=read_only_dir, ro=read_only_dir / "ro") for a in command]
    with as_nobody():
        code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "permission denied" in err and str(read_only_dir / "ro") in err
    assert list((read_only_dir / "ro").iterdir()) == []
