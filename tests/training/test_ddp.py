"""`kvp train` under torchrun with 2 CPU processes (gloo): DistributedDataParallel, rank 0 writes."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from kvpolicy.policy import checkpoint as ckpt
from kvpolicy.training.synthetic import SyntheticTraces, write_synthetic_traces

SHAPE = dict(n_layers=2, n_kv_heads=2, head_dim=16)


def _train(traces, val, out, *extra: str) -> subprocess.CompletedProcess:
    args = ["--traces", str(traces), "--val", str(val), "--out", str(out), "--steps", "6", "--batch", "4",
            "--tokens", "32", "--samples", "2", "--hidden", "8", "--val-every", "3", "--checkpoint-every", "3",
            "--warmup", "2", "--no-compile", "--no-bf16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *extra, "-m", "kvpolicy.cli", "train", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_two_process_ddp_training_writes_one_checkpoint(tmp_path):
    traces = write_synthetic_traces(tmp_path / "train", SyntheticTraces(8, length=64, **SHAPE, seed=0))
    val = write_synthetic_traces(tmp_path / "val", SyntheticTraces(2, length=64, **SHAPE, seed=1))
    run = _train(traces, val, tmp_path / "ddp", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("trained 4 agents") == 1  # only rank 0 reports
    assert "2 process(es)" in run.stdout
    single = _train(traces, val, tmp_path / "single")
    assert single.returncode == 0, single.stderr[-3000:]

    ddp, one = ckpt.load_checkpoint(tmp_path / "ddp"), ckpt.load_checkpoint(tmp_path / "single")
    assert ddp.config["state"]["processes"] == 2 and one.config["state"]["processes"] == 1
    assert ddp.config["state"]["step"] == 6 and ddp.config["state"]["best_step"] in (3, 6)
    shapes = {k: v.shape for k, v in ddp.policy.state_dict().items()}
    assert shapes == {k: v.shape for k, v in one.policy.state_dict().items()}
    assert all(torch.isfinite(v).all() for v in ddp.policy.state_dict().values())
    # nothing but the checkpoint directory was written (no per-rank or temporary leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single", "train", "val"]
    expected = sorted([ckpt.CARD, ckpt.CONFIG, ckpt.HISTORY, ckpt.WEIGHTS, ckpt.RESUME])
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == expected
