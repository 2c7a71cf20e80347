"""`kvp traces` end to end on SmolLM2 at tiny sizes: manifest, reader, resume, refusals, bytes on disk; an
unwritable --out refused before the model loads."""

from __future__ import annotations

import pytest
import torch

import os
import signal
import subprocess
import sys
import time

from kvpolicy.cli import main
from kvpolicy.errors import KVPError
from kvpolicy.models import loader
from kvpolicy.traces.pipeline import TraceRunConfig, record_shards
from kvpolicy.traces.store import TraceReader, shard_paths


def traces(out, *extra: str) -> list[str]:
    return ["traces", "--model", "smollm2-135m", "--out", str(out), *extra]


RULER_RUN = ("--source", "ruler", "--split", "train", "--n", "2", "--context", "256", "--future-tokens", "4",
             "--tasks", "niah_single_2,vt", "--shard-samples", "1")  # a sample per shard


@pytest.mark.model
def test_ruler_traces_record_resume_and_refuse_mixing(smollm, tmp_path, capsys):
    out = tmp_path / "ruler"
    assert main(traces(out, *RULER_RUN)) == 0
    assert "2 recorded now, 0 were already there" in capsys.readouterr().out
    reader = TraceReader(out)
    reader.check_model(smollm.info)
    m = reader.manifest
    assert m["source"] == "ruler" and m["split"] == "train" and m["future"]["mode"] == "greedy"
    assert m["model"]["fingerprint"] == smollm.info.fingerprint and m["seeds"]["ruler_seed"] == 0
    assert [s["id"] for s in m["samples"]] == ["ruler/train/niah_single_2/s0/0", "ruler/train/vt/s0/1"]
    assert len(shard_paths(out)) == 2
    assert all(220 <= s["length"] <= 256 and 1 <= s["future_length"] <= 4 for s in m["samples"])
    assert m["generation_seconds"] > 0 and m["model_seconds"] > 0 and m["code_version"].startswith("0.")
    sample = reader.read(1, 7)
    assert sample.keys.shape == (3, m["samples"][1]["length"], 64) and (sample.utility >= 0).all()
    assert reader.baselines == []  # training traces carry no baseline scores by default
    on_disk = sum(p.stat().st_size for p in shard_paths(out))
    per_token_head = on_disk / (m["prompt_tokens"] * reader.model.n_agents)
    assert per_token_head <= 2 * 64 * 2 + 8  # fp16 keys and values + fp32 utility, plus headers

    # killed after the first shard: the rerun records only what is missing
    last = shard_paths(out)[-1]
    last.unlink()
    assert main(traces(out, *RULER_RUN)) == 0
    assert "1 recorded now, 1 were already there" in capsys.readouterr().out
    assert torch.equal(TraceReader(out).read(1, 3).utility, reader.read(1, 3).utility)  # deterministic
    assert main(traces(out, *RULER_RUN)) == 0
    assert "0 recorded now, 2 were already there" in capsys.readouterr().out

    # another run's settings into the same directory are refused with a one-line error
    assert main(traces(out, *RULER_RUN, "--future", "reference")) == 1
    assert "holds traces of another run" in capsys.readouterr().err
    assert main(traces(out, *RULER_RUN, "--cut-at", "mid-prompt")) == 1
    assert "holds traces of another run" in capsys.readouterr().err

    # the same prompts with caches cut mid-prompt: the rest of each prompt is part of its future
    mid = tmp_path / "mid"
    assert main(traces(mid, *RULER_RUN, "--cut-at", "mid-prompt")) == 0
    m_mid = TraceReader(mid).manifest
    assert m_mid["future"]["cut_at"] == "mid-prompt" and [s["id"] for s in m_mid["samples"]] == [
        s["id"] for s in m["samples"]]
    for whole, cut in zip(m["samples"], m_mid["samples"]):
        assert cut["prompt_length"] == whole["length"] and 0.25 * whole["length"] - 1 <= cut["length"]
        assert cut["length"] <= 0.75 * whole["length"] + 1
        assert cut["future_length"] > whole["length"] - cut["length"]


@pytest.mark.model
def test_a_killed_run_resumes_where_it_stopped(smollm, tmp_path, capsys):
    out = tmp_path / "killed"
    args = ("--source", "ruler", "--n", "4", "--context", "160", "--future-tokens", "2", "--tasks", "niah_single_2",
            "--shard-mb", "1")
    run = subprocess.Popen([sys.executable, "-m", "kvpolicy.cli", *traces(out, *args)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not shard_paths(out) and time.time() < deadline and run.poll() is None:
        time.sleep(0.2)
    run.send_signal(signal.SIGKILL)
    run.wait()
    finished = shard_paths(out)
    assert 1 <= len(finished) < 4 and not (out / "manifest.json").exists()
    assert main(traces(out, *args)) == 0
    assert f"{4 - len(finished)} recorded now, {len(finished)} were already there" in capsys.readouterr().out
    assert len(TraceReader(out)) == 4 and not list(out.glob(".*"))  # no temporaries left behind


@pytest.mark.model
def test_dialogue_reference_traces_with_baselines(smollm, tmp_path):
    out = tmp_path / "dialogue"
    args = ("--source", "dialogue", "--split", "val", "--n", "1", "--context", "320", "--future", "reference",
            "--future-tokens", "6")
    assert main(traces(out, *args)) == 0
    reader = TraceReader(out)
    s = reader.manifest["samples"][0]
    assert s["id"].startswith("sharegpt/") and s["future_length"] == 6
    assert "OASST2" in reader.manifest["source_description"]
    assert reader.baselines == ["tova", "snapkv", "snapkv_w16"]  # held-out traces carry them for the ranking benchmark
    for name in reader.baselines:
        scores = reader.read_baseline(0, 12, name)
        assert scores.shape == (3, s["length"]) and scores.dtype == torch.float32 and torch.isfinite(scores).all()


@pytest.mark.model
def test_bad_requests_fail_cleanly(smollm, tmp_path, capsys):
    assert main(traces(tmp_path / "a", "--source", "ruler", "--n", "1", "--context", "9000")) == 1
    assert "refused: --context 9000" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main(traces(tmp_path / "b", "--source", "ruler", "--n", "1", "--context", "40")) == 1
    assert "too few for RULER task" in capsys.readouterr().err
    assert not list((tmp_path / "b").glob("*.safetensors"))
    assert main(traces(tmp_path / "c", "--source", "ruler", "--n", "1", "--baselines", "h2o")) == 1
    assert "unknown baselines" in capsys.readouterr().err
    assert main(traces(tmp_path / "d", "--source", "ruler", "--n", "1", "--shard-samples", "0")) == 1
    assert "--shard-samples must be at least 1" in capsys.readouterr().err


def test_unwritable_out_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "traces"  # root ignores permission bits, but not a regular file where a directory must be

    def load_model(name):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loader, "load_model", load_model)
    assert main(traces(out, "--source", "ruler", "--n", "1")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write trace directory: {blocker}" in err
    with pytest.raises(KVPError, match="cannot write trace directory"):
        record_shards(None, TraceRunConfig(source="ruler", n=1), out)  # the library refuses before touching the model
