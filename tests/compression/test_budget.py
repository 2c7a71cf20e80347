"""Budget validation and the top-b selection with protected sinks / recent tokens (pure maths, no model)."""

from __future__ import annotations

import pytest
import torch
from kvpress.utils import compute_n_kept

from kvpolicy.compression.budget import Budget, keep_indices, keep_indices_reference, protected_scores
from kvpolicy.errors import KVPError


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"tokens": 0},
        {"tokens": -5},
        {"tokens": 2.5},
        {"tokens": True},
        {"tokens": "64"},
        {"tokens": 64, "ratio": 0.5},
        {"ratio": 1.0},
        {"ratio": -0.1},
        {"tokens": 64, "sinks": -1},
        {"tokens": 64, "recent": 1.5},
        {"tokens": 16},  # below the default 4 sinks + 16 recent it promises to keep
        {"tokens": 10, "sinks": 8, "recent": 8},
    ],
)
def test_bad_budgets_are_refused(kwargs):
    with pytest.raises(KVPError):
        Budget(**kwargs)


def test_kept_and_label():
    assert Budget(tokens=256).kept(1000) == 256
    assert Budget(tokens=256).kept(100) == 100  # a budget >= length keeps everything
    assert Budget(ratio=0.0).kept(77) == 77
    for length in (1, 7, 100, 1023):
        for ratio in (0.1, 0.25, 0.5, 0.9, 0.99):
            assert Budget(ratio=ratio).kept(length) == compute_n_kept(length, ratio)
    assert Budget(tokens=256).label == "b256"
    assert Budget(ratio=0.5).label == "r0.50"


def _evicted_positions(B: int, H: int, T: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(B, H, T) ascending true positions of a cache that already lost entries (sinks and last tokens kept)."""
    rows = []
    for _ in range(B * H):
        middle = torch.randperm(length - 8, generator=gen)[: T - 8] + 4
        rows.append(torch.cat([torch.arange(4), middle.sort().values, torch.arange(length - 4, length)]))
    return torch.stack(rows).view(B, H, T)


# ratios 0.95 / 0.81 / 0.53 keep 3 / 12 / 30 of the 64 entries: fewer than sinks + recent, the overflow case
@pytest.mark.parametrize("budget", [Budget(ratio=0.95), Budget(ratio=0.81), Budget(tokens=40), Budget(tokens=63),
                                    Budget(tokens=100), Budget(ratio=0.5, sinks=0, recent=0),
                                    Budget(ratio=0.53, sinks=2, recent=40), Budget(tokens=20, sinks=0, recent=5)])
def test_keep_indices_matches_reference(budget):
    gen = torch.Generator().manual_seed(0)
    B, H, T, length = 2, 3, 64, 150
    scores = torch.randn(B, H, T, generator=gen)
    for positions in (torch.arange(T).expand(B, H, T), _evicted_positions(B, H, T, length, gen)):
        true_length = int(positions.max()) + 1
        fast = keep_indices(scores, positions, budget, true_length)
        assert fast.shape == (B, H, budget.kept(T))
        assert torch.equal(fast, keep_indices_reference(scores, positions, budget, true_length))


def test_protected_entries_always_kept_and_cuts_nest():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(1, 4, 200, generator=gen)
    positions = torch.arange(200).expand(1, 4, 200)
    previous = None
    for b in range(20, 201, 10):
        keep = keep_indices(scores, positions, Budget(tokens=b), 200)
        assert (keep.diff(dim=-1) > 0).all()  # ascending, no repeats
        kept = [set(row.tolist()) for row in keep[0]]
        for head in kept:
            assert set(range(4)) <= head and set(range(184, 200)) <= head
        if previous is not None:
            assert all(p <= k for p, k in zip(previous, kept))  # rank once, cut anywhere: nested kept sets
        previous = kept


def test_a_ratio_that_cannot_keep_every_protected_position_says_which_it_kept():
    assert Budget(ratio=0.5).shortfall(100) is None
    assert Budget(tokens=20).shortfall(19) is None  # the whole cache is kept
    note = Budget(ratio=0.75).shortfall(40)  # keeps 10 < 4 + 16
    assert note == ("r0.75 keeps 10 of 40 entries per head, fewer than the 4 sinks + 16 recent positions "
                    "promised: kept 4 sinks and the 6 newest tokens")
    keep = keep_indices(torch.zeros(1, 1, 40), torch.arange(40).expand(1, 1, 40), Budget(ratio=0.75), 40)
    assert keep[0, 0].tolist() == [0, 1, 2, 3, 34, 35, 36, 37, 38, 39]


def test_shape_mismatch_is_refused():
    with pytest.raises(KVPError):
        keep_indices(
            torch.zeros(1, 2, 5), torch.zeros(1, 2, 6, dtype=torch.long), Budget(tokens=3, sinks=0, recent=0), 6
        )


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e6])
def test_protected_keys_survive_a_wrapper_that_rescales_or_adds(scale):
    """kvpress presses that wrap ours rescale or shift its scores: protected keys stay finite and keep their order
    above every score, whatever the scores' magnitude."""
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(2, 3, 120, generator=gen) * scale
    positions = torch.arange(120).expand(2, 3, 120)
    budget = Budget(tokens=40)
    keys = protected_scores(scores, positions, budget, 120)
    expected = keep_indices_reference(scores, positions, budget, 120)
    for wrapped in (keys, keys * 4, keys * 1e-3, keys + 3 * scale, keys * 2 - 5 * scale):
        assert torch.isfinite(wrapped).all()
        assert torch.equal(wrapped.topk(40, dim=-1).indices.sort(dim=-1).values, expected)
