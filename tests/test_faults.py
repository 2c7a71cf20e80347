"""Fault injection. Read-only outputs are refused before any work; and kill `kvp traces`, `kvp train` and
`kvp sweep` at random points (SIGKILL, or SIGTERM as a user's `kill`/Ctrl-C), re-run the same command, and compare
with an uninterrupted run: identical results.

Each stage runs for real on SmolLM2 at a tiny size; the kill lands at a random moment after the stage has
started writing (the random stream is seeded, so a failure reproduces).
"""

from __future__ import annotations

import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kvpolicy.cli import EXIT_INTERRUPTED
from kvpolicy.evaluation.store import read_results
from kvpolicy.traces.store import TraceReader
from kvpolicy.training.synthetic import SyntheticTraces, write_synthetic_traces

TRACES = ["traces", "--source", "ruler", "--split", "train", "--n", "6", "--context", "160", "--future-tokens", "6",
          "--tasks", "niah_single_1", "--shard-samples", "1"]
TRAIN = ["train", "--steps", "200", "--batch", "4", "--samples", "4", "--tokens", "32", "--checkpoint-every", "7",
         "--val-every", "20", "--val-samples", "2", "--warmup", "5", "--no-compile"]
SWEEP = ["sweep", "--task", "ruler:niah_single_1", "--context", "192", "--n", "3", "--budget", "32", "64",
         "--max-new-tokens", "3"]
# fields of a result that are measurements of time or bookkeeping, not of the result itself
VOLATILE = {"seconds", "prefill_seconds", "created"}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "KVP_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}


def kvp(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "kvpolicy.cli", *args], env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def kill_midway(args: list[str], progressed, rng: random.Random, sig: int, spread: float) -> bool:
    """Start `kvp ARGS`, wait until `progressed(since)` says this run has written something (since: its start
    time), then send `sig` after a random delay in [0, spread) s. Returns whether the signal reached a running
    process (False: it had already finished)."""
    since = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "kvpolicy.cli", *args], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not progressed(since) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0, spread))
    alive = proc.poll() is None
    if alive:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    if alive and sig == signal.SIGTERM:
        # saved its progress and said so, or had just finished
        assert proc.returncode in (0, EXIT_INTERRUPTED), err[-2000:]
    return alive


def newer(path: Path, pattern: str):
    """progressed(since): a file matching `pattern` under `path` was written after `since`."""
    return lambda since: any(p.stat().st_mtime > since for p in path.glob(pattern))


def _traces_equal(a: Path, b: Path) -> None:
    ra, rb = TraceReader(a), TraceReader(b)
    assert len(ra) == len(rb)
    strip = ("seconds", "model_seconds", "shard")
    assert [{k: v for k, v in s.items() if k not in strip} for s in ra.manifest["samples"]] == \
           [{k: v for k, v in s.items() if k not in strip} for s in rb.manifest["samples"]]
    for i in range(len(ra)):
        x, y = ra.read_layers(i), rb.read_layers(i)
        for name in ("keys", "values", "utility"):
            assert torch.equal(getattr(x, name), getattr(y, name)), (i, name)


def _checkpoints_equal(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "policy.safetensors")), load_file(str(b / "policy.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (a, b))
    assert ca["state"]["val_history"] == cb["state"]["val_history"]
    assert (ca["state"]["step"], ca["state"]["best_step"]) == (cb["state"]["step"], cb["state"]["best_step"])


def _results(path: Path) -> dict[str, dict]:
    out = {}
    for r in read_results(path).records:
        assert r.key not in out, "a key was written twice"
        out[r.key] = {k: v for k, v in r.to_json().items() if k not in VOLATILE}
    return out


@pytest.mark.model
def test_killed_runs_resume_to_the_results_of_an_uninterrupted_run(tmp_path):
    rng = random.Random(20261129)
    straight, broken = tmp_path / "straight", tmp_path / "broken"

    # traces: SIGKILL while shards are being written, twice
    kvp(*TRACES, "--out", str(straight / "traces"))
    out = broken / "traces"
    hits = [kill_midway([*TRACES, "--out", str(out)], newer(out, "shard-*.safetensors"), rng, signal.SIGKILL, 2.0)
            for _ in range(2)]
    assert any(hits), "no kill reached a running `kvp traces`"
    kvp(*TRACES, "--out", str(out))
    _traces_equal(straight / "traces", out)

    # training: SIGKILL between checkpoints, then SIGTERM (saves at once, possibly before the first validation)
    kvp(*TRAIN, "--traces", str(straight / "traces"), "--out", str(straight / "ckpt"))
    ckpt = broken / "ckpt"
    hits = [kill_midway([*TRAIN, "--traces", str(straight / "traces"), "--out", str(ckpt)],
                        newer(ckpt, "config.json"), rng, sig, 1.5) for sig in (signal.SIGKILL, signal.SIGTERM)]
    assert any(hits), "no signal reached a running `kvp train`"
    kvp(*TRAIN, "--traces", str(straight / "traces"), "--out", str(ckpt))
    _checkpoints_equal(straight / "ckpt", ckpt)

    # sweep: SIGKILL after the first records, the learned policy among the scorers
    scorers = ["--scorer", "knorm", "random", f"kvp:{straight / 'ckpt'}"]
    kvp(*SWEEP, *scorers, "--out", str(straight / "results.jsonl"))
    results = broken / "results.jsonl"
    hits = [kill_midway([*SWEEP, *scorers, "--out", str(results)], newer(broken, "results.jsonl"), rng,
                        signal.SIGKILL, 3.0) for _ in range(2)]
    assert any(hits), "no kill reached a running `kvp sweep`"
    kvp(*SWEEP, *scorers, "--out", str(results))
    expected, got = _results(straight / "results.jsonl"), _results(results)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == expected[key], key


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

    for module in ("traces.cli", "training.cli", "sweep_cli", "report.cli"):  # as root: nobody cannot read the stdlib
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
