"""`kvp sweep` under torchrun with 2 CPU processes: each rank starts on its own share of the work units, every
result is written once into the one results file and equals a single process's, and a rank that fails (while
planning or while computing) stops the other with a one-line error instead of hanging it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvpolicy.evaluation.store import read_results
from kvpolicy.evaluation.sweep import SweepConfig, rank_order, run_sweep

TASK = ["--task", "ruler:niah_single_1", "--context", "160", "--n", "2", "--max-new-tokens", "4"]

# a torchrun program that runs `kvp` with one step of the sweep failing on rank 1: {owner}.{name} raises
FAIL_ON_RANK_1 = """import os, sys
from kvpolicy.cli import main
from kvpolicy.errors import KVPError
from kvpolicy.evaluation import qa, sweep


def fail(*args, **kwargs):
    raise KVPError("injected failure on rank 1")


if os.environ["RANK"] == "1":
    setattr({owner}, "{name}", fail)
sys.exit(main(sys.argv[1:]))
"""


def torchrun(program: list[str], out: Path, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 PROGRAM -- sweep --out OUT ARGS`: the "--" keeps torchrun's own parser from
    reading our --n as an abbreviation of its --nnodes/--nproc-per-node."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *program,
               "--", "sweep", "--out", str(out), *TASK, *args]
    env = os.environ | {"OMP_NUM_THREADS": "1", "KVP_PROGRESS": "0"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_each_rank_starts_on_its_own_share_then_takes_the_others_from_their_far_end():
    assert rank_order(7, 0, 2) == [0, 2, 4, 6, 5, 3, 1]
    assert rank_order(7, 1, 2) == [1, 3, 5, 6, 4, 2, 0]
    assert rank_order(4, 0, 1) == [0, 1, 2, 3]
    for n, world in [(1, 2), (5, 3), (9, 4)]:
        orders = [rank_order(n, rank, world) for rank in range(world)]
        assert all(sorted(order) == list(range(n)) for order in orders)
        firsts = [order[0] for order in orders[:n]]
        assert len(set(firsts)) == len(firsts)  # no two ranks start on the same unit


@pytest.mark.model
def test_two_ranks_share_the_units_and_match_a_single_process(smollm, one_thread, tmp_path):
    out, single = tmp_path / "ranks.jsonl", tmp_path / "single.jsonl"
    run = torchrun(["-m", "kvpolicy.cli"], out, "--budget", "32", "64", "--scorer", "knorm", "random")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("sweep: ") == 1  # rank 0 alone prints the summary
    counts = re.search(r"sweep: (\d+) new results \(rank 0: (\d+), rank 1: (\d+)\), (\d+) already done", run.stdout)
    assert counts, run.stdout
    total, rank0, rank1, done = map(int, counts.groups())
    assert total == rank0 + rank1 == 2 * (1 + 2 * 2) and done == 0  # 2 samples x (full cache + 2 scorers x 2 budgets)
    assert rank0 > 0 and rank1 > 0

    shared = read_results(out)
    assert shared.duplicates == 0 and len(shared.records) == total
    reference = run_sweep(SweepConfig(out=str(single), scorers=["knorm", "random"], budgets=["32", "64"],
                                      tasks=["ruler:niah_single_1"], context_tokens=[160], n_samples=2,
                                      max_new_tokens=4))
    assert reference.per_rank == [total] and reference.rank == 0
    assert {r.key: r.value for r in shared.records} == {r.key: r.value for r in read_results(single).records}


@pytest.mark.model
@pytest.mark.parametrize("owner, name", [("sweep.Sweep", "plan"), ("qa", "run_qa")])
def test_a_failing_rank_stops_the_other_without_a_hang(smollm, tmp_path, owner, name):
    program = tmp_path / "fail_on_rank_1.py"
    program.write_text(FAIL_ON_RANK_1.format(owner=owner, name=name))
    out = tmp_path / "r.jsonl"
    run = torchrun([str(program)], out, "--budget", "32", "--scorer", "knorm")
    assert run.returncode != 0
    assert "kvp sweep: error: injected failure on rank 1" in run.stderr
    assert "kvp sweep: error: another rank failed (rank 0 stopped too)" in run.stderr
    assert "sweep: " not in run.stdout
    if name == "plan":  # rank 0 stops before its first unit
        assert not out.exists()
    else:  # rank 0 takes over the units rank 1 let go, then stops
        results = read_results(out)
        assert results.duplicates == 0 and len(results.records) == 2 * 2  # 2 samples x (full cache + knorm)
