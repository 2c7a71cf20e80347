"""The one greedy loop: per-row stops, the stop token kept, and which tokens are fed."""

from __future__ import annotations

import pytest
import torch

from kvpolicy.errors import KVPError
from kvpolicy.models.decoding import greedy_tokens

VOCAB = 10


class Scripted:
    """A fake model whose row r emits scripts[r][i] as its i-th greedy token; records every fed step."""

    def __init__(self, scripts: list[list[int]]):
        self.scripts, self.fed = scripts, []

    def logits(self, i: int) -> torch.Tensor:
        rows = [script[min(i, len(script) - 1)] for script in self.scripts]
        return torch.nn.functional.one_hot(torch.tensor(rows), VOCAB).float()

    def feed(self, step: torch.Tensor) -> torch.Tensor:
        assert step.shape == (len(self.scripts), 1) and step.dtype == torch.int64
        self.fed.append(step[:, 0].tolist())
        return self.logits(len(self.fed))


def test_each_row_stops_at_its_own_stop_token_which_is_kept():
    model = Scripted([[1, 2, 9, 3], [4, 9, 5, 6], [7, 8, 8, 9]])
    tokens = greedy_tokens(model.feed, model.logits(0), 10, stop_ids={9})
    assert tokens == [[1, 2, 9], [4, 9], [7, 8, 8, 9]]
    # every token is fed but the last step, where every row has stopped; stopped rows keep being fed
    assert model.fed == [[1, 4, 7], [2, 9, 8], [9, 5, 8]]


def test_the_last_token_is_fed_when_max_tokens_ends_decoding():
    model = Scripted([[1, 2, 3, 4, 5]])
    assert greedy_tokens(model.feed, model.logits(0), 3, stop_ids={9}) == [[1, 2, 3]]
    assert model.fed == [[1], [2], [3]]  # the cache then holds the whole answer and its next-token logits


def test_no_tokens_and_no_feed_for_zero_max_tokens():
    model = Scripted([[1], [2]])
    assert greedy_tokens(model.feed, model.logits(0), 0, stop_ids=()) == [[], []]
    assert model.fed == []


def test_logits_must_be_batch_by_vocab():
    with pytest.raises(KVPError, match=r"\(batch, vocab\)"):
        greedy_tokens(lambda step: step, torch.zeros(VOCAB), 4, stop_ids=())
