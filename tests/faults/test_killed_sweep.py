"""A killed `kvp sweep` resumes to the results of an uninterrupted run (SIGKILL after the first records, twice), the
bundled learned policy among the scorers."""

from __future__ import annotations

import signal

import pytest

SWEEP = ["sweep", "--task", "ruler:niah_single_1", "--context", "192", "--n", "3", "--budget", "32", "64",
         "--max-new-tokens", "3", "--scorer", "knorm", "random", "kvp:smollm2-135m"]


@pytest.mark.model
def test_killed_sweeps_resume_to_the_results_of_an_uninterrupted_run(killer, tmp_path):
    straight, broken = tmp_path / "straight.jsonl", tmp_path / "broken.jsonl"
    killer.straight_and_killed(SWEEP, straight, broken, killer.newer(tmp_path, "broken.jsonl"),
                               (signal.SIGKILL, signal.SIGKILL), 3.0)
    killer.assert_results_equal(straight, broken)
