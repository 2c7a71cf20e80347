"""`kvp experiment --preset`: every stage of every preset is a valid kvp command, stages run in order into one
directory, a finished stage is recorded with its wall time and skipped on a re-run (unless its output is gone), and a
failing one stops the run unrecorded. The studies' stages are checked here; the recipes' and the demo's in
tests/test_presets.py."""

from __future__ import annotations

import json

import pytest

from kvpolicy.cli import EXIT_INTERRUPTED, build_parser, main
from kvpolicy.errors import KVPError
from kvpolicy.experiment import PRESETS
from kvpolicy.presets.study import StudyConfig


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_stage_is_a_kvp_command(preset, tmp_path):
    plan = PRESETS[preset].stages(tmp_path)
    parser = build_parser()
    for stage in plan:
        parser.parse_args(list(stage.argv))  # argparse exits on a wrong flag or choice
    names = [s.name for s in plan]
    assert len(set(names)) == len(names) and names[-1] == "report"
    assert all(stage.output is None or tmp_path in stage.output.parents for stage in plan)


@pytest.mark.parametrize("preset", [name for name, cfg in PRESETS.items() if isinstance(cfg, StudyConfig)])
def test_a_study_trains_the_per_corpus_policies(preset, tmp_path):
    plan = PRESETS[preset].stages(tmp_path)
    trains = {s.name: s.argv for s in plan if s.argv[0] == "train"}
    assert set(trains) == {"train-kvp-r", "train-kvp-d", "train-kvp-d-long"}
    long_traces = next(s.argv for s in plan if s.name == "traces-dialogue-long-train")
    assert long_traces[long_traces.index("--context") + 1] == str(PRESETS[preset].stream_context)
    costs = next(s.argv for s in plan if s.name == "costs")
    assert f"kvp:{tmp_path / 'kvp-r'}" in costs and f"kvp:{PRESETS[preset].model}" in costs and "oracle" in costs
    assert f"kvp:{tmp_path / 'kvp-d-long'}" not in costs  # trained at the streams' length: evaluated on them only
    by_length = next(s.argv for s in plan if s.name == "long-generation-dialogue-kvp-d")
    dialogue = next(s.argv for s in plan if s.name == "long-generation-dialogue")
    scorers = by_length[by_length.index("--scorer") + 1:]
    assert scorers == (f"kvp:{tmp_path / 'kvp-d'}", f"kvp:{tmp_path / 'kvp-d-long'}")
    assert by_length[:by_length.index("--scorer")] == dialogue[:dialogue.index("--scorer")]
    ruler = next(s.argv for s in plan if s.name == "ruler")
    budgets = [int(b) for b in ruler[ruler.index("--budget") + 1: ruler.index("--scorer")]]
    assert min(budgets) / PRESETS[preset].context == 0.03125 and max(budgets) / PRESETS[preset].context == 0.5


@pytest.mark.model
def test_the_long_generation_stages_ask_for_no_more_texts_than_the_data_holds(smollm, tmp_path):
    """Each long-generation stage's task yields the --n texts of --context tokens it asks for (asking for more is
    refused before any work, so a preset asking too many could never run), and the long dialogue traces find their
    --n prompts in their split."""
    from kvpolicy.evaluation.tasks import resolve_tasks
    from kvpolicy.traces.sources import trace_prompts

    plan = PRESETS["smollm2"].stages(tmp_path)
    streams = {s.argv[s.argv.index("--task") + 1]: s.argv for s in plan if s.name.startswith("long-generation")}
    assert len(streams) == 2
    for argv in streams.values():
        (task,) = resolve_tasks([argv[argv.index("--task") + 1]])
        n, context = int(argv[argv.index("--n") + 1]), int(argv[argv.index("--context") + 1])
        samples = task.load(smollm, n, context, 0)
        assert len(samples) == n and all(s.ids.shape == (1, context) for s in samples)
        with pytest.raises(KVPError, match="holds only"):
            task.load(smollm, n + 1 if task.name.endswith("essays") else 10_000, context, 0)
    for argv in (s.argv for s in plan if s.name.startswith("traces-dialogue-long")):
        source, split, n, context = (argv[argv.index(flag) + 1] for flag in ("--source", "--split", "--n", "--context"))
        assert len(list(trace_prompts(smollm, source, split, int(n), int(context)))) == int(n)


def test_bad_sizes_and_stages_are_refused(tmp_path, capsys):
    with pytest.raises(KVPError, match="samples must be at least 1"):
        StudyConfig("smollm2-135m", samples=0)
    assert main(["experiment", "--preset", "smollm2", "--out", str(tmp_path), "--stage", "nope"]) == 1
    assert "unknown stage nope" in capsys.readouterr().err
    assert not (tmp_path / "stages.json").exists()


def test_an_interrupted_stage_says_so_and_is_not_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("kvpolicy.experiment.run_stage", lambda argv: EXIT_INTERRUPTED)  # the stage, interrupted
    assert main(["experiment", "--preset", "smollm2", "--out", str(tmp_path), "--stage", "costs"]) == EXIT_INTERRUPTED
    out = capsys.readouterr().out
    assert "[costs] interrupted; re-run the same command to resume" in out and "failed" not in out
    assert not (tmp_path / "stages.json").exists()


def test_a_recorded_stage_whose_output_is_gone_runs_again(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr("kvpolicy.experiment.run_stage", lambda argv: ran.append(argv) or 0)
    stage = next(s for s in PRESETS["smollm2"].stages(tmp_path) if s.name == "train-kvp-r")
    (tmp_path / "stages.json").write_text(json.dumps({stage.name: {"argv": list(stage.argv), "seconds": 151.2}}))
    argv = ["experiment", "--preset", "smollm2", "--out", str(tmp_path), "--stage", stage.name]
    assert main([*argv, "--list"]) == 0 and not ran
    assert f"done earlier, but its output {tmp_path / 'kvp-r'} is gone; to run again" in capsys.readouterr().out
    assert main(argv) == 0 and ran == [list(stage.argv)]  # a fresh checkout given the stage log alone
    assert f"output {tmp_path / 'kvp-r'} is gone; running it again" in capsys.readouterr().out
    (tmp_path / "kvp-r").mkdir()  # what the stage wrote (the command here is a stand-in)
    assert main(argv) == 0 and len(ran) == 1
    assert "[train-kvp-r] done earlier" in capsys.readouterr().out


def test_list_without_a_preset_shows_every_preset_and_where_it_writes(capsys):
    assert main(["experiment", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == list(PRESETS)
    assert any(line.startswith("bundled-smollm2 ") and "(--out runs/smollm2-135m)" in line for line in listed)
    assert any(line.startswith("smollm2 ") and "(--out runs/experiment-smollm2)" in line for line in listed)
    assert main(["experiment"]) == 1
    assert "name a preset: kvp experiment --preset NAME" in capsys.readouterr().err


def test_a_stage_writing_outside_the_output_directory_is_done_once_recorded(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr("kvpolicy.experiment.run_stage", lambda argv: ran.append(argv) or 0)
    argv = ["experiment", "--preset", "bundled-smollm2", "--out", str(tmp_path), "--stage", "bundle"]
    assert main(argv) == 0 and len(ran) == 1 and ran[0][:2] == ["policies", "--bundle"]
    assert "[bundle] done in 0 s" in capsys.readouterr().out
    assert main(argv) == 0 and len(ran) == 1  # `kvp policies --bundle` writes into the package: no --out to check
    assert "[bundle] done earlier" in capsys.readouterr().out


@pytest.mark.model
def test_stages_run_once_and_record_their_wall_time(tmp_path, monkeypatch, capsys, one_thread):
    tiny = StudyConfig("smollm2-135m", context=256, future_tokens=4, train_prompts=2, val_prompts=1)
    monkeypatch.setitem(PRESETS, "tiny", tiny)
    argv = ["experiment", "--preset", "tiny", "--out", str(tmp_path), "--stage", "traces-ruler-train"]
    assert main(argv) == 0
    log = json.loads((tmp_path / "stages.json").read_text())
    assert list(log) == ["traces-ruler-train"] and log["traces-ruler-train"]["seconds"] > 0
    assert (tmp_path / "traces" / "ruler-train" / "manifest.json").is_file()
    capsys.readouterr()
    assert main(argv) == 0
    assert "done earlier" in capsys.readouterr().out
    assert main(["experiment", "--preset", "tiny", "--out", str(tmp_path), "--list"]) == 0
    listed = capsys.readouterr().out
    assert "traces-ruler-train (done in" in listed and "train-kvp-r (to run)" in listed
    # a stage that fails (training on traces not recorded yet) stops the run and is not recorded as done
    assert main(["experiment", "--preset", "tiny", "--out", str(tmp_path), "--stage", "train-kvp-d"]) == 1
    assert "failed" in capsys.readouterr().out
    assert list(json.loads((tmp_path / "stages.json").read_text())) == ["traces-ruler-train"]


def test_under_torchrun_every_rank_runs_the_collective_stages_and_rank_0_the_others(tmp_path, monkeypatch, capsys):
    """Rank 1 of 2 runs traces and sweeps (each does its share), waits for rank 0 to record the export it runs alone,
    prints nothing and writes no stage log; rank 0 runs and records all three."""
    import contextlib
    import threading

    from kvpolicy.experiment import read_stage_log, run_stages
    from kvpolicy.presets.stage import Stage

    plan = [Stage("traces", ("traces", "--out", str(tmp_path / "t"))),
            Stage("export", ("export", "--out", str(tmp_path / "p"))),
            Stage("sweep", ("sweep", "--out", str(tmp_path / "r.jsonl")))]
    ran = []
    monkeypatch.setattr("kvpolicy.experiment.run_stage", lambda argv: ran.append(argv[0]) or 0)
    monkeypatch.setattr("kvpolicy.distributed.held_process_group", lambda device: contextlib.nullcontext())  # no peer
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    log = tmp_path / "stages.json"
    rank_0 = threading.Timer(0.3, lambda: log.write_text(json.dumps({"export": {"argv": list(plan[1].argv),
                                                                                  "seconds": 1.0}})))
    rank_0.start()  # rank 0 records the export a moment later: rank 1 waits for it before the sweep
    assert run_stages(plan, tmp_path) == 0 and ran == ["traces", "sweep"]
    assert capsys.readouterr().out == "" and list(read_stage_log(log)) == ["export"]
    log.unlink()
    monkeypatch.setenv("RANK", "0")
    ran.clear()
    assert run_stages(plan, tmp_path) == 0 and ran == ["traces", "export", "sweep"]
    assert sorted(read_stage_log(log)) == ["export", "sweep", "traces"]
    assert "[export] done in" in capsys.readouterr().out
