"""Fault probe, training (issue 33): a damaged resume state or training log is refused in one line, a run that skips
most of its batches fails without overwriting its checkpoint, a full disk while saving is one line, two runs on one
--out never both write it, and validation traces that are training traces are refused."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from kvpolicy import cli
from kvpolicy.errors import KVPError
from kvpolicy.io import sha256_file
from kvpolicy.policy import checkpoint as ckpt
from kvpolicy.policy.network import PolicyConfig, PolicyNet
from kvpolicy.training.synthetic import SyntheticTraces, write_synthetic_traces
from kvpolicy.training.trainer import TrainConfig, Trainer

SHAPE = dict(n_layers=2, n_kv_heads=2, head_dim=8)
LENGTH = 48
TRAIN = ["--steps", "4", "--batch", "4", "--samples", "2", "--tokens", "16", "--hidden", "8", "--warmup", "1",
         "--val-every", "2", "--val-samples", "1", "--checkpoint-every", "2", "--no-compile", "--no-bf16"]

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:step .*skipped a batch")]


@pytest.fixture
def traces(tmp_path) -> Path:
    return write_synthetic_traces(tmp_path / "traces", SyntheticTraces(8, length=LENGTH, **SHAPE, seed=0))


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "KVP_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}


def _kvp(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvpolicy.cli", *args]


def one_line_error(argv: list[str], capsys) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, (code, err)
    return err


def _train(traces: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--traces", str(traces), "--out", str(out), *TRAIN, *extra]


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""

    def expired(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _config(**kw) -> TrainConfig:
    base = dict(steps=10, batch=4, tokens=16, samples=2, warmup=2, ema_start=2, val_every=5, checkpoint_every=10,
                val_samples=1, compile=False, bf16=False)
    return TrainConfig(**(base | kw))


def _trainer(out: Path, train: SyntheticTraces | None = None, **kw) -> Trainer:
    train = train or SyntheticTraces(8, length=LENGTH, **SHAPE, seed=0)
    return Trainer(train, out, policy=PolicyConfig(**SHAPE, hidden=8, max_position=LENGTH), config=_config(**kw),
                   progress=False)


# ----- 4: the resume state is hashed; a run that skips most of its batches fails


def test_the_resume_state_is_hashed_and_a_damaged_one_is_refused_without_rewriting_it(traces, tmp_path, capsys):
    """Before: one flipped exponent bit made every later step skip its batch, and the run exited 0 and saved the
    bad state again."""
    out = tmp_path / "ckpt"
    assert cli.main(_train(traces, out)) == 0
    config = json.loads((out / ckpt.CONFIG).read_text())
    assert config["resume_sha256"] == sha256_file(out / ckpt.RESUME)
    data = bytearray((out / ckpt.RESUME).read_bytes())
    data[-1] ^= 0x40  # an exponent bit of the last value
    (out / ckpt.RESUME).write_bytes(bytes(data))
    before = _snapshot(out)
    err = one_line_error(_train(traces, out, "--steps", "8"), capsys)
    assert "resume.safetensors" in err and "damaged" in err and "--restart" in err, err
    assert _snapshot(out) == before
    assert cli.main(_train(traces, out, "--steps", "8", "--restart")) == 0


def test_resume_tensors_that_are_not_finite_are_refused(tmp_path):
    out = tmp_path / "ckpt"
    _trainer(out).run()
    config = ckpt.read_config(out)
    resume = load_file(str(out / ckpt.RESUME))
    name = next(k for k in resume if k.startswith("param."))
    resume[name][0] = float("inf")
    ckpt.save_checkpoint(out, config, load_file(str(out / ckpt.WEIGHTS)), resume, ckpt.load_history(out))
    with pytest.raises(KVPError, match=f"non-finite.*{name}.*--restart") as err:
        _trainer(out, steps=20)
    assert "\n" not in str(err.value)


class _DamagedTraces(SyntheticTraces):
    """The same trace set (same manifest hash) with every key non-finite: every batch is skipped."""

    def read_layers(self, sample, layers=None):
        t = super().read_layers(sample, layers)
        t.keys[..., 0] = float("nan")
        return t


def test_a_run_skipping_most_batches_fails_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    _trainer(out).run()
    before = _snapshot(out)
    damaged = _DamagedTraces(8, length=LENGTH, **SHAPE, seed=0)
    resumed = _trainer(out, damaged, steps=30)
    assert resumed.step == 10
    with pytest.raises(KVPError, match="10 of 10 steps skipped non-finite batches: the learning rate may be too high "
                                       "or the traces or checkpoint damaged") as err:
        resumed.run()
    assert "\n" not in str(err.value) and "step 10" in str(err.value)
    assert _snapshot(out) == before  # the good checkpoint is not overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # lock released, nothing left behind


def test_the_skip_threshold_is_more_than_half_of_the_steps_and_at_least_a_few():
    from kvpolicy.training.trainer import MIN_SKIPPED, too_many_skipped

    assert not too_many_skipped(MIN_SKIPPED - 1, MIN_SKIPPED - 1)  # a short run: too few to judge
    assert too_many_skipped(MIN_SKIPPED, MIN_SKIPPED)
    assert not too_many_skipped(50, 100) and too_many_skipped(51, 100)


def test_kvp_train_with_a_huge_learning_rate_exits_non_zero_in_one_line(traces, tmp_path, capsys):
    """Before: 19 of 20 batches skipped, exit status 0."""
    out = tmp_path / "ckpt"
    err = one_line_error(_train(traces, out, "--lr", "1e30", "--steps", "20", "--checkpoint-every", "100"), capsys)
    assert "steps skipped non-finite batches" in err and "learning rate" in err, err
    assert not out.exists()


# ----- 5: a full disk while saving


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # ignored dispositions survive exec: a write gets EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_save_that_cannot_write_its_files_is_one_line_and_keeps_the_previous_checkpoint(traces, tmp_path, capsys):
    """Before: a SafetensorError traceback (not an OSError, so the CLI missed it). Files are limited in size here
    (RLIMIT_FSIZE), as a full disk would stop them."""
    out = tmp_path / "ckpt"
    assert cli.main(_train(traces, out)) == 0
    before = _snapshot(out)
    limit = len(before[ckpt.WEIGHTS]) + 16  # the weights fit, the resume state (weights + EMA + moments) does not
    done = subprocess.run(_kvp(*_train(traces, out, "--steps", "8")), env=_env(), capture_output=True, text=True,
                          timeout=300, preexec_fn=_limit_file_size(limit))
    err = done.stderr.strip()
    assert done.returncode == 1 and len(err.splitlines()) == 1, (done.returncode, err[-3000:])
    assert f"cannot write checkpoint {out}" in err and "too large" in err and "re-run" in err, err
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "traces"]  # no temporaries, no lock


def test_a_full_disk_met_when_flushing_a_checkpoint_is_one_line(tmp_path, monkeypatch):
    """Some file systems report a full disk only when written data is flushed (fsync)."""
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "ckpt"
    with pytest.raises(KVPError, match=f"cannot write checkpoint {out}: no space left on the device") as err:
        _trainer(out).run()
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


# ----- 6: the training log and config are read line by line and checked


@pytest.mark.parametrize("damage, problem", [
    (lambda lines: lines[:1] + ["{not json"] + lines[2:], "history.jsonl:2 is not valid JSON"),
    (lambda lines: lines[:1] + ['["a", "list"]'] + lines[2:], "history.jsonl:2: expected a JSON object"),
    (lambda lines: lines[:1] + [json.dumps({**json.loads(lines[1]), "step": "two"})] + lines[2:],
     "history.jsonl:2: field 'step' must be an integer"),
])
def test_a_damaged_training_log_is_refused_naming_its_line(traces, tmp_path, capsys, damage, problem):
    """Before: a JSONDecodeError traceback when resuming."""
    out = tmp_path / "ckpt"
    assert cli.main(_train(traces, out, "--steps", "20", "--checkpoint-every", "10")) == 0
    history = out / ckpt.HISTORY
    lines = history.read_text().splitlines()
    assert len(lines) == 2  # logged every 10 steps
    history.write_text("\n".join(damage(lines)) + "\n")
    err = one_line_error(_train(traces, out, "--steps", "24", "--checkpoint-every", "10"), capsys)
    assert problem in err and "--restart" in err, err


def test_a_torn_last_line_of_the_training_log_is_refused(tmp_path):
    out = tmp_path / "ckpt"
    _trainer(out, log_every=5).run()
    history = out / ckpt.HISTORY
    history.write_bytes(history.read_bytes()[:-5])
    with pytest.raises(KVPError, match="history.jsonl:2 is cut short"):
        ckpt.load_history(out)


@pytest.mark.parametrize("name", [ckpt.CONFIG, ckpt.RESUME, ckpt.HISTORY, ckpt.WEIGHTS])
def test_checkpoint_files_that_are_not_regular_files_are_refused_in_one_line(tmp_path, name):
    """Before: a FIFO as history.jsonl (or model.safetensors) hung the reader; as config.json it was reported as
    'no config.json'."""
    out = tmp_path / "ckpt"
    _trainer(out).run()
    (out / name).unlink()
    os.mkfifo(out / name)
    with deadline(20), pytest.raises(KVPError, match=f"{out / name} is a FIFO \\(named pipe\\), not a regular file") \
            as err:
        if name == ckpt.WEIGHTS:
            ckpt.load_checkpoint(out)
        else:
            _trainer(out, steps=20)
    assert "\n" not in str(err.value)


def test_kvp_policies_refuses_a_damaged_bundled_config_in_one_line(tmp_path, monkeypatch, capsys):
    """Before: `kvp policies` read each bundled config.json with a bare json.loads (a traceback)."""
    from kvpolicy.policy import bundled

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / ckpt.CONFIG).write_text('{"format": "kvpolicy-checkpoint/1", ')
    monkeypatch.setattr(bundled, "BUNDLED_DIR", tmp_path)
    err = one_line_error(["policies"], capsys)
    assert str(tmp_path / "m" / ckpt.CONFIG) in err and "not valid JSON" in err, err


def test_a_checkpoint_saved_without_resume_state_records_no_resume_hash(tmp_path):
    """A bundled policy is saved from a trained checkpoint's config: it must not keep that checkpoint's resume hash."""
    net_config = PolicyConfig(**SHAPE, hidden=8, max_position=LENGTH)
    model = {"name": "synthetic", "fingerprint": "f", "n_layers": 2, "n_kv_heads": 2, "head_dim": 8}
    written = ckpt.save_checkpoint(tmp_path / "c", {"model": model, "policy": net_config.to_dict(),
                                                   "resume_sha256": "stale"}, PolicyNet(net_config).state_dict())
    assert "resume_sha256" not in written and "resume_sha256" not in ckpt.read_config(tmp_path / "c")


# ----- 7: one writer per checkpoint directory


def _wait_for_lock(lock: Path, pid: int, proc: subprocess.Popen) -> None:
    deadline_at = time.monotonic() + 120
    while time.monotonic() < deadline_at and proc.poll() is None:
        with contextlib.suppress(OSError):
            if lock.read_text().strip() == str(pid):
                return
        time.sleep(0.05)
    pytest.fail(f"the first run never took the lock {lock} (exit status {proc.poll()})")


def test_a_second_train_on_the_same_out_refuses_at_once_and_a_killed_run_blocks_no_one(traces, tmp_path):
    """Before: two runs with different seeds on one --out both reported success, and one result was lost."""
    out = tmp_path / "ckpt"
    lock = tmp_path / ".ckpt.lock"
    first = subprocess.Popen(_kvp(*_train(traces, out, "--steps", "1000000", "--checkpoint-every", "1000000",
                                          "--val-every", "1000000")),
                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lock(lock, first.pid, first)
        started = time.monotonic()
        second = subprocess.run(_kvp(*_train(traces, out, "--seed", "1")), env=_env(), capture_output=True,
                                text=True, timeout=300)
        err = second.stderr.strip()
        assert second.returncode == 1 and len(err.splitlines()) == 1, (second.returncode, err[-3000:])
        assert f"another kvp train is writing {out} (pid {first.pid}); wait for it or choose another --out" in err
        assert time.monotonic() - started < 60
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()  # SIGKILL: no chance to release anything
        first.wait(timeout=60)
    third = subprocess.run(_kvp(*_train(traces, out, "--seed", "1")), env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert ckpt.read_config(out)["training"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "traces"]  # a finished run removes its lock file


# ----- 13: validation traces must be held out


@pytest.mark.parametrize("case", ["same", "link", "copy", "overlapping sets"])
def test_validation_traces_that_are_training_traces_are_refused(traces, tmp_path, capsys, case):
    """Before: `kvp train --val DIR` with DIR a --traces dir was accepted silently."""
    train, val = [traces], [traces]
    if case == "link":
        (tmp_path / "link").symlink_to(traces)
        val = [tmp_path / "link"]
    elif case == "copy":
        val = [Path(shutil.copytree(traces, tmp_path / "copy"))]
    elif case == "overlapping sets":
        other = write_synthetic_traces(tmp_path / "other", SyntheticTraces(4, length=LENGTH, **SHAPE, seed=5))
        held = write_synthetic_traces(tmp_path / "held", SyntheticTraces(2, length=LENGTH, **SHAPE, seed=7))
        train, val = [other, traces], [held, traces]
    out = tmp_path / "ckpt"
    err = one_line_error(["train", "--traces", *map(str, train), "--val", *map(str, val), "--out", str(out), *TRAIN],
                         capsys)
    assert "are also training traces" in err and "held-out" in err, err
    assert not out.exists()
