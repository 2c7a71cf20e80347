"""A killed `kvp traces` resumes to the traces of an uninterrupted run (SIGKILL while shards are written, twice)."""

from __future__ import annotations

import signal

import pytest

TRACES = ["traces", "--source", "ruler", "--split", "train", "--n", "6", "--context", "160", "--future-tokens", "6",
          "--tasks", "niah_single_1", "--shard-samples", "1"]


@pytest.mark.model
def test_killed_traces_resume_to_the_traces_of_an_uninterrupted_run(killer, tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    killer.straight_and_killed(TRACES, straight, broken, killer.newer(broken, "shard-*.safetensors"),
                               (signal.SIGKILL, signal.SIGKILL), 2.0)
    killer.assert_traces_equal(straight, broken)
