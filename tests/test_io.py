"""Atomic writes, the crash-safe directory swap and the fail-fast output check (kvpolicy/io.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvpolicy import io
from kvpolicy.errors import KVPError


def _write_dir(path: Path, content: str) -> None:
    with io.atomic_path(path) as tmp:
        tmp.mkdir()
        (tmp / "data").write_text(content)


def test_a_directory_is_replaced_whole_and_nothing_is_left_beside_it(tmp_path):
    _write_dir(tmp_path / "d", "one")
    _write_dir(tmp_path / "d", "two")
    assert (tmp_path / "d" / "data").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_the_exchange_is_atomic_where_the_system_has_it(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    if not io._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not supported on this file system")
    assert (tmp_path / "b" / "x").read_text() == "a" and not (tmp_path / "a" / "x").exists()


def test_a_kill_inside_the_fallback_swap_is_recovered(tmp_path):
    path = tmp_path / "d"
    _write_dir(path, "old")
    # killed after parking the old version, before the new one arrived
    os.replace(path, io._previous(path))
    io.recover_directory(path)
    assert (path / "data").read_text() == "old" and not io._previous(path).exists()
    # killed after the new version arrived, before the parked one was removed
    _write_dir(tmp_path / "parked", "old")
    os.replace(tmp_path / "parked", io._previous(path))
    io.recover_directory(path)
    assert (path / "data").read_text() == "old" and not io._previous(path).exists()


def test_check_writable_accepts_what_can_be_written(tmp_path):
    io.check_writable(tmp_path / "new" / "deeper" / "results.jsonl", "results file")
    io.check_writable(tmp_path / "dir", "trace directory", directory=True)
    (tmp_path / "results.jsonl").write_text("{}\n")
    io.check_writable(tmp_path / "results.jsonl", "results file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]  # the check leaves nothing behind
    assert (tmp_path / "results.jsonl").read_text() == "{}\n"


@pytest.mark.parametrize("target, directory, message", [
    ("file/out.jsonl", False, "file: a part of the path is not a directory"),
    ("file/sub/ckpt", True, "file: a part of the path is not a directory"),
    ("file", True, "file is a regular file, not a directory"),
    ("dir", False, "dir is a directory"),
])
def test_check_writable_refuses_in_one_line(tmp_path, target, directory, message):
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    with pytest.raises(KVPError, match=message) as err:
        io.check_writable(tmp_path / target, "output", directory=directory)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_check_writable_refuses_a_read_only_directory(public_tmp, as_nobody):
    ro = public_tmp / "ro"
    ro.mkdir()
    (ro / "existing").mkdir()
    ro.chmod(0o555)
    with as_nobody():
        for target, directory in ((ro / "results.jsonl", False), (ro / "ckpt", True), (ro / "existing", True)):
            with pytest.raises(KVPError, match="permission denied"):
                io.check_writable(target, "output", directory=directory)


def test_describe_os_error_names_the_path():
    err = OSError(28, "No space left on device", "/data/shard.safetensors")
    assert io.describe_os_error(err) == "/data/shard.safetensors: no space left on the device"
