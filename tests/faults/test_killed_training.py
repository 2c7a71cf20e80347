"""A killed `kvp train` resumes to the checkpoint of an uninterrupted run: SIGKILL between checkpoints, then SIGTERM
(which saves at once, possibly before the first validation). The traces are synthetic ones of SmolLM2's shape (30
layers x 3 KV heads, head size 64): training reads traces only, so resuming it does not depend on where they came
from."""

from __future__ import annotations

import signal

from kvpolicy.training.synthetic import SyntheticTraces, write_synthetic_traces

TRAIN = ["train", "--steps", "200", "--batch", "4", "--samples", "4", "--tokens", "32", "--checkpoint-every", "7",
         "--val-every", "20", "--val-samples", "2", "--warmup", "5", "--no-compile"]


def test_killed_training_resumes_to_the_checkpoint_of_an_uninterrupted_run(killer, tmp_path):
    traces = write_synthetic_traces(tmp_path / "traces", SyntheticTraces(6, length=160, n_layers=30, n_kv_heads=3,
                                                                        head_dim=64))
    train = [*TRAIN, "--traces", str(traces)]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    killer.straight_and_killed(train, straight, broken, killer.newer(broken, "config.json"),
                               (signal.SIGKILL, signal.SIGTERM), 1.5)
    killer.assert_checkpoints_equal(straight, broken)
