"""Fault probe, files: what kvpolicy reads and writes is a regular file (or a new path) or is refused in one line
before any work; JSONL is read a bounded line at a time; the link rule (a user-named path is followed, an entry of a
directory kvpolicy manages is never a link) holds for every command; a resumed trace run says when its thread count
differs from the samples already recorded."""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from kvpolicy import cli
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.store import ResultStore, read_results
from kvpolicy.io import check_writable, read_lines, special_kind
from kvpolicy.policy.checkpoint import has_checkpoint, read_config, save_checkpoint
from kvpolicy.traces.store import MANIFEST, shard_paths
from kvpolicy.training.synthetic import SyntheticTraces, write_synthetic_traces


@pytest.fixture
def traces(tmp_path) -> Path:
    out = tmp_path / "traces"
    write_synthetic_traces(out, SyntheticTraces(4, length=48, n_layers=2, n_kv_heads=2, head_dim=8))
    return out


@pytest.fixture
def no_model(monkeypatch):
    from kvpolicy.models import loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))


def one_line_error(argv: list[str], capsys) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, (code, err)
    return err


def test_special_kind_names_what_a_path_is(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "file").write_text("x")
    assert special_kind("/dev/zero") == "a character device"
    assert special_kind(tmp_path / "fifo") == "a FIFO (named pipe)"
    assert special_kind(tmp_path) == "a directory"
    assert special_kind(tmp_path / "file") is None and special_kind(tmp_path / "missing") is None


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_results_path_that_is_not_a_regular_file_is_refused_by_sweep_report_and_store(kind, traces, tmp_path,
                                                                                        capsys, no_model):
    results = tmp_path / "R.jsonl"
    if kind == "device":
        results.symlink_to("/dev/zero")  # read forever before: the machine ran out of memory
        said = "is a character device, not a regular file"
    else:
        os.mkfifo(results)  # "does not exist" (report) or "not seekable" (sweep) before
        said = "is a FIFO (named pipe), not a regular file"
    err = one_line_error(["sweep", "--out", str(results), "--task", f"traces:{traces}", "--scorer", "knorm"], capsys)
    assert said in err and str(results) in err
    err = one_line_error(["report", str(results), "--out", str(tmp_path / "report")], capsys)
    assert said in err and str(results) in err
    assert not (tmp_path / "report").exists()
    with pytest.raises(KVPError, match=re.escape(said)):
        ResultStore(results)
    with pytest.raises(KVPError, match=re.escape(said)):
        read_results(results)


def test_check_writable_refuses_special_files_for_files_and_directories(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(KVPError, match="is a FIFO"):
        check_writable(tmp_path / "fifo", "results file")
    with pytest.raises(KVPError, match="is a character device, not a directory"):
        check_writable("/dev/null", "report directory", directory=True)


def test_jsonl_is_read_a_bounded_line_at_a_time(tmp_path):
    results = tmp_path / "R.jsonl"
    results.write_bytes(b"x" * (3 << 20))  # one 3 MiB line: not a results file, and never read whole
    with pytest.raises(KVPError, match="longer than 1,048,576 bytes"):
        read_results(results)
    with pytest.raises(KVPError, match="longer than"):
        ResultStore(results)
    with open(tmp_path / "ok", "wb") as f:
        f.write(b'{"a": 1}\n{"b": 2}\n{"c"')
    with open(tmp_path / "ok", "rb") as f:
        assert read_lines(f, "ok") == (b'{"a": 1}\n{"b": 2}\n', b'{"c"')


def test_traces_and_train_refuse_a_shard_that_is_a_link_alike(traces, tmp_path, capsys, no_model):
    """Before: `kvp train` refused the link but `kvp traces` exited 0 and rewrote the manifest, so the fix looped."""
    shard = shard_paths(traces)[0]
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.move(shard, elsewhere)
    shard.symlink_to(elsewhere)
    manifest = (traces / MANIFEST).read_bytes()
    for argv in (["traces", "--source", "ruler", "--n", "4", "--context", "48", "--out", str(traces)],
                 ["train", "--traces", str(traces), "--out", str(tmp_path / "ckpt"), "--steps", "2", "--no-compile"]):
        err = one_line_error(argv, capsys)
        assert "is a symbolic link" in err and shard.name in err, err
    assert (traces / MANIFEST).read_bytes() == manifest and elsewhere.exists()
    assert not (tmp_path / "ckpt").exists()


def test_a_manifest_that_is_a_link_is_refused(traces, tmp_path, capsys, no_model):
    target = tmp_path / "manifest-elsewhere.json"
    shutil.move(traces / MANIFEST, target)
    (traces / MANIFEST).symlink_to(target)
    err = one_line_error(["train", "--traces", str(traces), "--out", str(tmp_path / "ckpt"), "--no-compile"], capsys)
    assert "trace manifest" in err and "symbolic link" in err


def _checkpoint(path: Path, seed: int) -> None:
    weights = {"w": torch.full((2,), float(seed))}
    model = {"name": "m", "fingerprint": "f", "n_layers": 1, "n_kv_heads": 1, "head_dim": 2}
    save_checkpoint(path, {"model": model, "policy": {"n_layers": 1, "n_kv_heads": 1, "head_dim": 2}}, weights)


def test_a_symlinked_checkpoint_out_is_written_through_and_the_link_survives(tmp_path):
    """Before: the link was replaced by a real directory, and the target never saw the checkpoint."""
    target, link = tmp_path / "real-ckpt", tmp_path / "ckpt"
    target.mkdir()
    link.symlink_to(target)
    for seed in (1, 2):  # a first write, then a replacement of an existing checkpoint
        _checkpoint(link, seed)
        assert link.is_symlink() and os.readlink(link) == str(target)
        assert has_checkpoint(target) and read_config(link) == read_config(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "real-ckpt"]  # no temporaries left


@pytest.mark.model
def test_a_trace_run_resumed_with_another_thread_count_says_so(smollm, tmp_path):
    from kvpolicy.traces.future import FutureConfig
    from kvpolicy.traces.pipeline import TraceRunConfig, record_shards
    from kvpolicy.traces.store import TraceWriter

    def config(n: int) -> TraceRunConfig:
        return TraceRunConfig("ruler", n=n, context_tokens=160, future=FutureConfig("greedy", 2), baselines=(),
                              tasks=("niah_single_1",), shard_samples=1)

    def run(n: int, threads: int) -> list[str]:
        cfg = config(n)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                record_shards(smollm, cfg, tmp_path / "t", show_progress=False)
        finally:
            torch.set_num_threads(before)
        return [str(w.message) for w in caught if "thread" in str(w.message)]

    assert run(1, 1) == []
    assert run(2, 1) == []  # same thread count: silent
    said = run(3, 2)
    assert len(said) == 1 and "recorded with 1 CPU thread(s), this run uses 2" in said[0]
    # recorded per sample, so the manifest keeps it too
    assert TraceWriter(tmp_path / "t", config(3).manifest_fields(smollm)).threads == {1, 2}


def test_a_local_hub_file_that_is_a_fifo_is_refused_by_name(tmp_path):
    from kvpolicy.data.hub import load_hub

    os.mkfifo(tmp_path / "boolq.jsonl")  # datasets would block on it forever
    with pytest.raises(KVPError, match=re.escape("is a FIFO (named pipe), not a regular file; give an existing")):
        load_hub("boolq", local=tmp_path / "boolq.jsonl")


def test_a_warning_on_the_command_line_is_one_line_like_an_error(tmp_path, capsys):
    write_synthetic_traces(tmp_path / "one", SyntheticTraces(1, length=48, n_layers=2, n_kv_heads=2, head_dim=8))
    assert cli.main(["train", "--traces", str(tmp_path / "one"), "--out", str(tmp_path / "ckpt"), "--steps", "2",
                     "--batch", "2", "--val-every", "2", "--warmup", "1", "--no-compile"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kvp train: warning: only one training trace and no --val: validating on the training trace "
                   "itself"], err
    assert warnings.showwarning.__module__ == "warnings"  # the library's own display is back after the command


def test_a_directory_that_is_not_a_checkpoint_is_named_as_such(tmp_path):
    from kvpolicy.policy.checkpoint import read_config

    (tmp_path / "config.json").write_text('{"format": "other"}')  # a JSON file of something else
    with pytest.raises(KVPError, match="is not a KVP checkpoint .* give the --out directory of a `kvp train` run"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # a Hugging Face model directory
    with pytest.raises(KVPError, match="is not a KVP checkpoint but a model directory: train one with `kvp fit "):
        read_config(tmp_path)
