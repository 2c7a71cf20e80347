"""Faults of `kvp experiment` (issue 33): a damaged stage log (OUT/stages.json) is one line naming it and saying what
to do, never a traceback, with or without --list; one that is not a regular file is refused; the logs that real runs
wrote still read."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from kvpolicy.cli import main
from kvpolicy.experiment import PRESETS, read_stage_log

DOCS = Path(__file__).parents[2] / "docs" / "results"


@pytest.fixture
def no_stage_runs(monkeypatch):
    monkeypatch.setattr("kvpolicy.experiment.run_stage", lambda argv: pytest.fail(f"ran a stage: {argv}"))


def _costs(tmp_path) -> list[str]:
    return next(list(s.argv) for s in PRESETS["smollm2"].stages(tmp_path) if s.name == "costs")


@pytest.mark.parametrize("listing", [False, True], ids=["run", "list"])
@pytest.mark.parametrize("text, problem", [
    ('{"costs": {"argv": ["sweep", "--mo', "is not valid JSON"),
    ("", "is not valid JSON"),
    ("\xff\xfe", "is not valid JSON"),
    ("[]", "expected a JSON object, got list"),
    ('{"costs": 3}', "field 'costs' must be an object"),
    ('{"costs": {}}', "field 'costs.argv' is missing"),
    ('{"costs": {"argv": "sweep"}}', "field 'costs.argv' must be a list"),
    ('{"costs": {"argv": ["sweep"]}}', "field 'costs.seconds' is missing"),
    ('{"costs": {"argv": ["sweep"], "seconds": "long"}}', "field 'costs.seconds' must be a number"),
])
def test_a_damaged_stage_log_is_one_line_naming_it(tmp_path, capsys, no_stage_runs, listing, text, problem):
    log = tmp_path / "stages.json"
    log.write_bytes(text.encode("latin-1"))
    argv = ["experiment", "--preset", "smollm2", "--out", str(tmp_path), "--stage", "costs"]
    assert main(argv + ["--list"] * listing) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"kvp experiment: error: {log}") and captured.err.count("\n") == 1, captured.err
    assert problem in captured.err and "delete it" in captured.err and "Traceback" not in captured.err
    assert log.read_bytes() == text.encode("latin-1")  # left for the user to look at


def test_a_recorded_stage_whose_argv_matches_reads_with_list(tmp_path, capsys, no_stage_runs):
    (tmp_path / "stages.json").write_text(json.dumps({"costs": {"argv": _costs(tmp_path), "seconds": 41.5}}))
    (tmp_path / "results.jsonl").write_text("")
    assert main(["experiment", "--preset", "smollm2", "--out", str(tmp_path), "--list"]) == 0
    assert "costs (done in 42 s)" in capsys.readouterr().out


class Hung(Exception):
    """Blocked reading the stage log (a FIFO: opening one waits for a writer)."""


def _hung(signum, frame):
    raise Hung


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_stage_log_that_is_not_a_regular_file_is_refused(tmp_path, capsys, no_stage_runs, kind):
    log = tmp_path / "stages.json"
    log.mkdir() if kind == "directory" else os.mkfifo(log)
    what = "a directory" if kind == "directory" else "a FIFO (named pipe)"
    previous = signal.signal(signal.SIGALRM, _hung)  # a FIFO read would block: fail the test, never hang it
    for listing in ([], ["--list"]):
        signal.alarm(20)
        try:
            code = main(["experiment", "--preset", "smollm2", "--out", str(tmp_path), *listing])
        finally:
            signal.alarm(0)
        assert code == 1
        err = capsys.readouterr().err
        assert err.startswith("kvp experiment: error: ") and err.count("\n") == 1
        assert f"{log} is {what}, not a regular file" in err
    signal.signal(signal.SIGALRM, previous)


def test_the_stage_logs_of_the_recorded_studies_still_read(tmp_path):
    logs = sorted(DOCS.glob("*/stages.json"))
    assert logs
    for log in logs:
        copy = tmp_path / log.parent.name / "stages.json"
        copy.parent.mkdir()
        shutil.copy(log, copy)
        assert read_stage_log(copy) == json.loads(log.read_text())
    assert read_stage_log(tmp_path / "missing" / "stages.json") == {}
