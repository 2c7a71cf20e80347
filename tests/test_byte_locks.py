"""The one lock primitive: byte locks of a sidecar file exclude other processes, byte by byte, and die with them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvpolicy.byte_locks import ByteLocks

HOLD_BYTE_3 = """import sys, time
from kvpolicy.byte_locks import ByteLocks
locks = ByteLocks(sys.argv[1])
assert locks.acquire(3)
print("held", flush=True)
time.sleep(60)
"""


def test_a_byte_held_by_another_process_is_refused_until_it_dies(tmp_path):
    path = tmp_path / "sub" / "f.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_BYTE_3, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        locks = ByteLocks(path)
        assert locks.acquire(3, wait=False) is False  # refused at once, not waited for
        with locks.hold(4, wait=False) as held:  # another byte is free
            assert held
        assert locks.is_current()
    finally:
        holder.kill()
        holder.wait()
    assert locks.acquire(3, wait=False)  # the lock died with its process
    os.unlink(path)
    assert not locks.is_current()  # the file was removed under the open descriptor
    locks.close()


def test_a_link_is_never_followed(tmp_path):
    (tmp_path / "target").write_text("")
    (tmp_path / "f.lock").symlink_to(tmp_path / "target")
    with pytest.raises(OSError):
        ByteLocks(tmp_path / "f.lock").acquire(0)
