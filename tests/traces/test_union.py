"""Several trace sets of one model read as one (`kvp train --traces A B`): sample order, refusal of another model's
set, and a checkpoint that records every part."""

from __future__ import annotations

import json

import pytest
import torch

from kvpolicy.cli import main
from kvpolicy.errors import KVPError
from kvpolicy.traces.store import TraceReader
from kvpolicy.traces.union import TraceUnion, open_traces
from kvpolicy.training.synthetic import SyntheticTraces, write_synthetic_traces

SHAPE = dict(n_layers=2, n_kv_heads=2, head_dim=16)


@pytest.fixture
def two_sets(tmp_path):
    a = write_synthetic_traces(tmp_path / "a", SyntheticTraces(3, length=64, **SHAPE))
    b = write_synthetic_traces(tmp_path / "b", SyntheticTraces(2, length=96, seed=7, **SHAPE))
    return a, b


def test_union_concatenates_the_sets_in_order(two_sets):
    a, b = (TraceReader(d) for d in two_sets)
    union = TraceUnion([a, b])
    assert len(union) == 5 and union.lengths == [64, 64, 64, 96, 96]
    assert union.locate(2) == (a, 2) and union.locate(3) == (b, 0) and union.locate(4) == (b, 1)
    for i, (part, j) in enumerate([(a, 0), (a, 1), (a, 2), (b, 0), (b, 1)]):
        got, want = union.read_layers(i, [1]), part.read_layers(j, [1])
        torch.testing.assert_close(got.utility, want.utility)
        torch.testing.assert_close(got.keys, want.keys)
    with pytest.raises(KVPError, match="out of range"):
        union.read_layers(5)
    assert TraceUnion([b, a]).manifest_hash != union.manifest_hash  # the order is part of what fixes the union
    assert isinstance(open_traces([str(two_sets[0])]), TraceReader)


def test_union_refuses_another_models_traces(two_sets, tmp_path):
    other = write_synthetic_traces(tmp_path / "other", SyntheticTraces(2, length=64, query_seed=99, **SHAPE))
    with pytest.raises(KVPError, match="another model"):
        open_traces([str(two_sets[0]), str(other)])
    with pytest.raises(KVPError, match="at least one"):
        TraceUnion([])


def test_kvp_train_reads_several_trace_sets_and_records_each(two_sets, tmp_path, one_thread):
    val = write_synthetic_traces(tmp_path / "val", SyntheticTraces(2, length=64, seed=3, **SHAPE))
    ckpt = tmp_path / "ckpt"
    assert main(["train", "--traces", *map(str, two_sets), "--val", str(val), "--out", str(ckpt), "--steps", "2",
                 "--batch", "2", "--tokens", "16", "--hidden", "8", "--val-every", "2", "--warmup", "1",
                 "--no-compile"]) == 0
    train = json.loads((ckpt / "config.json").read_text())["traces"]["train"]
    assert train["n_samples"] == 5 and train["prompts_used"] == 5
    assert [p["n_samples"] for p in train["parts"]] == [3, 2]
    assert [p["directory"] for p in train["parts"]] == list(map(str, two_sets))
    assert train["manifest_hash"] == TraceUnion([TraceReader(d) for d in two_sets]).manifest_hash
    assert json.loads((ckpt / "config.json").read_text())["policy"]["max_position"] == 96
