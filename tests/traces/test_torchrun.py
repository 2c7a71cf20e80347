"""`kvp traces` under torchrun with 2 CPU processes: ranks split the samples, rank 0 writes one manifest."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kvpolicy.traces.pipeline import TraceRunConfig, record_traces
from kvpolicy.traces.future import FutureConfig
from kvpolicy.traces.store import TraceReader, shard_paths

pytestmark = pytest.mark.model


def torchrun(out, *args: str) -> subprocess.CompletedProcess:
    """`torchrun ... -m kvpolicy.cli -- traces ...`: the "--" keeps torchrun's own parser from reading our --n as an
    abbreviation of its --nnodes/--nproc-per-node."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "kvpolicy.cli", "--", "traces", "--out", str(out), "--source", "ruler", "--tasks", "niah_single_2",
               "--future-tokens", "3", *args]
    env = os.environ | {"OMP_NUM_THREADS": "1", "KVP_PROGRESS": "0"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_two_ranks_split_the_samples_and_merge_one_manifest(smollm, tmp_path):
    run = torchrun(tmp_path, "--n", "3", "--context", "160")
    assert run.returncode == 0, run.stderr[-3000:]
    assert {p.name[:10] for p in shard_paths(tmp_path)} == {"shard-r000", "shard-r001"}
    reader = TraceReader(tmp_path)
    m = reader.manifest
    assert m["last_run"]["world_size"] == 2 and m["last_run"]["recorded"] == 3 and len(reader) == 3
    assert [s["shard"][:10] for s in m["samples"]] == ["shard-r000", "shard-r001", "shard-r000"]
    # rank 1's sample is the same trace a single process records
    single = tmp_path / "single"
    cfg = TraceRunConfig("ruler", n=2, context_tokens=160, future=FutureConfig("greedy", 3), tasks=("niah_single_2",))
    record_traces(smollm, cfg, single, show_progress=False)
    torch.testing.assert_close(TraceReader(single).read(1, 4).utility, reader.read(1, 4).utility, atol=1e-5, rtol=1e-4)


def test_a_failing_rank_does_not_hang_the_others(tmp_path):
    run = torchrun(tmp_path, "--n", "1", "--context", "40")  # rank 0 fails on its prompt, rank 1 has no sample
    assert run.returncode != 0
    assert "too few for RULER task" in run.stderr and "another rank failed" in run.stderr
    assert not (tmp_path / "manifest.json").exists()
