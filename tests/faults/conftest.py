"""What the kill-and-resume tests share (tests/faults/test_killed_*.py): run a `kvp` command to the end, or start it
and kill it at a random moment after it has started writing, and compare what two runs wrote.

Each test kills one stage on SmolLM2 at a tiny size (SIGKILL, or SIGTERM as a user's `kill`/Ctrl-C), re-runs the
same command and compares with an uninterrupted run: identical results. The random stream is seeded, so a failure
reproduces. The stages are separate files, so that `pytest -n` runs them side by side."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kvpolicy.cli import EXIT_INTERRUPTED
from kvpolicy.evaluation.store import read_results
from kvpolicy.traces.store import TraceReader

# fields of a result that are measurements of time or bookkeeping, not of the result itself
VOLATILE = {"seconds", "prefill_seconds", "created"}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "KVP_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}


class Killer:
    """Runs `kvp` commands in their own processes, killing some midway at seeded random moments."""

    def __init__(self, seed: int = 20261129):
        self.rng = random.Random(seed)

    @staticmethod
    def run(*args: str) -> subprocess.CompletedProcess:
        """`kvp ARGS` to the end; it must succeed."""
        done = subprocess.run([sys.executable, "-m", "kvpolicy.cli", *args], env=_env(), capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    def kill_midway(self, args: list[str], progressed: Callable[[float], bool], sig: int, spread: float) -> bool:
        """Start `kvp ARGS`, wait until `progressed(since)` says this run has written something (since: its start
        time), then send `sig` after a random delay in [0, spread) s. Returns whether the signal reached a running
        process (False: it had already finished)."""
        since = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "kvpolicy.cli", *args], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not progressed(since) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(self.rng.uniform(0, spread))
        alive = proc.poll() is None
        if alive:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        if alive and sig == signal.SIGTERM:
            # saved its progress and said so, or had just finished
            assert proc.returncode in (0, EXIT_INTERRUPTED), err[-2000:]
        return alive

    def straight_and_killed(self, args: list[str], straight: Path, broken: Path, progressed: Callable[[float], bool],
                            signals: tuple[int, ...], spread: float) -> None:
        """`kvp ARGS --out straight` to the end; `kvp ARGS --out broken` killed midway once per signal (see
        kill_midway), at least one of them reaching a running process, then re-run to the end."""
        self.run(*args, "--out", str(straight))
        hits = [self.kill_midway([*args, "--out", str(broken)], progressed, sig, spread) for sig in signals]
        assert any(hits), f"no signal reached a running `kvp {args[0]}`"
        self.run(*args, "--out", str(broken))

    @staticmethod
    def newer(path: Path, pattern: str) -> Callable[[float], bool]:
        """progressed(since): a file matching `pattern` under `path` was written after `since`."""
        return lambda since: any(p.stat().st_mtime > since for p in path.glob(pattern))

    @staticmethod
    def assert_traces_equal(a: Path, b: Path) -> None:
        ra, rb = TraceReader(a), TraceReader(b)
        assert len(ra) == len(rb)
        strip = ("seconds", "model_seconds", "shard")
        assert [{k: v for k, v in s.items() if k not in strip} for s in ra.manifest["samples"]] == \
               [{k: v for k, v in s.items() if k not in strip} for s in rb.manifest["samples"]]
        for i in range(len(ra)):
            x, y = ra.read_layers(i), rb.read_layers(i)
            for name in ("keys", "values", "utility"):
                assert torch.equal(getattr(x, name), getattr(y, name)), (i, name)

    @staticmethod
    def assert_checkpoints_equal(a: Path, b: Path) -> None:
        wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        ca, cb = (json.loads((p / "config.json").read_text()) for p in (a, b))
        assert ca["state"]["val_history"] == cb["state"]["val_history"]
        assert (ca["state"]["step"], ca["state"]["best_step"]) == (cb["state"]["step"], cb["state"]["best_step"])

    @staticmethod
    def assert_results_equal(a: Path, b: Path) -> None:
        """The two results files hold the same keys, each once, with the same fields but timings."""
        def results(path: Path) -> dict[str, dict]:
            out = {}
            for r in read_results(path).records:
                assert r.key not in out, "a key was written twice"
                out[r.key] = {k: v for k, v in r.to_json().items() if k not in VOLATILE}
            return out

        expected, got = results(a), results(b)
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == expected[key], key


@pytest.fixture
def killer() -> Killer:
    """Runs `kvp` commands and kills some midway (seeded)."""
    return Killer()
