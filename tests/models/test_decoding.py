"""The one decoding loop: per-row stops (tokens and strings), which tokens are fed, and how tokens are chosen
(greedy, tempered, nucleus), reproducibly per row."""

from __future__ import annotations

import pytest
import torch

from kvpolicy.errors import KVPError
from kvpolicy.models.decoding import (
    GREEDY,
    Sampling,
    cut_at_stop,
    decode_tokens,
    inverse_cdf,
    top_p_mask,
    top_p_mask_reference,
)

VOCAB = 10
LETTERS = "abcdefghij"  # token t decodes to LETTERS[t]


def letters(tokens: list[int]) -> str:
    return "".join(LETTERS[t] for t in tokens)


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


class Markov:
    """A fake model whose next-token logits depend on its row's last token only: logits = table[last token]."""

    def __init__(self, seed: int = 0):
        self.table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2

    def feed(self, step: torch.Tensor) -> torch.Tensor:
        return self.table[step[:, 0]]

    def run(self, first: list[int], sampling: Sampling, steps: int = 12) -> list[list[int]]:
        return [a.tokens for a in decode_tokens(self.feed, self.table[first], steps, (), sampling)]


def test_each_row_stops_at_its_own_stop_token_which_is_kept():
    model = Scripted([[1, 2, 9, 3], [4, 9, 5, 6], [7, 8, 8, 9]])
    answers = decode_tokens(model.feed, model.logits(0), 10, stop_ids={9})
    assert [a.tokens for a in answers] == [[1, 2, 9], [4, 9], [7, 8, 8, 9]]
    assert {a.stop_reason for a in answers} == {"stop_token"}
    # every token is fed but the last step, where every row has stopped; stopped rows keep being fed
    assert model.fed == [[1, 4, 7], [2, 9, 8], [9, 5, 8]]


def test_the_last_token_is_fed_when_max_tokens_ends_decoding():
    model = Scripted([[1, 2, 3, 4, 5]])
    (answer,) = decode_tokens(model.feed, model.logits(0), 3, stop_ids={9})
    assert answer.tokens == [1, 2, 3] and answer.stop_reason == "max_new_tokens"
    assert model.fed == [[1], [2], [3]]  # the cache then holds the whole answer and its next-token logits


def test_no_tokens_and_no_feed_for_zero_max_tokens():
    model = Scripted([[1], [2]])
    answers = decode_tokens(model.feed, model.logits(0), 0, stop_ids=())
    assert [(a.tokens, a.stop_reason) for a in answers] == [([], "max_new_tokens")] * 2
    assert model.fed == []


def test_logits_must_be_batch_by_vocab():
    with pytest.raises(KVPError, match=r"\(batch, vocab\)"):
        decode_tokens(lambda step: step, torch.zeros(VOCAB), 4, stop_ids=())


def test_a_stop_string_spanning_tokens_ends_its_row_at_the_token_that_completes_it():
    # row 0 spells "bcdef": "cd" is complete with its 3rd token; row 1 stops at token 9; row 2 runs to the end
    model = Scripted([[1, 2, 3, 4, 5], [4, 9, 5, 6, 7], [5, 6, 7, 8, 6]])
    seen = []
    answers = decode_tokens(model.feed, model.logits(0), 4, {9}, stop_strings=["cd", "xyz"], text=letters,
                            on_token=lambda row, token: seen.append((row, token)))
    assert [(a.tokens, a.stop_reason) for a in answers] == [
        ([1, 2, 3], "stop_string"), ([4, 9], "stop_token"), ([5, 6, 7, 8], "max_new_tokens")]
    assert seen == [(0, 1), (1, 4), (2, 5), (0, 2), (1, 9), (2, 6), (0, 3), (2, 7), (2, 8)]
    assert cut_at_stop(letters(answers[0].tokens), ["cd", "xyz"]) == "b"


class Dropping:
    """A fake model that feeds only the rows its caller keeps (keep_rows) and replays each row's script."""

    def __init__(self, scripts: list[list[int]]):
        self.scripts, self.rows, self.fed, self.kept = scripts, list(range(len(scripts))), [], []
        self.steps = [0] * len(scripts)

    def logits(self) -> torch.Tensor:
        tokens = [self.scripts[r][min(self.steps[r], len(self.scripts[r]) - 1)] for r in self.rows]
        return torch.nn.functional.one_hot(torch.tensor(tokens), VOCAB).float()

    def keep_rows(self, kept: list[int]) -> None:
        self.kept.append(kept)
        self.rows = [self.rows[i] for i in kept]

    def feed(self, step: torch.Tensor) -> torch.Tensor:
        assert step.shape == (len(self.rows), 1)
        self.fed.append(dict(zip(self.rows, step[:, 0].tolist())))
        for r in self.rows:
            self.steps[r] += 1
        return self.logits()


def test_a_row_stops_once_answered_and_with_keep_rows_leaves_the_batch():
    scripts = [[1, 2, 3, 4, 5, 6], [4, 9, 5, 6, 7, 8], [5, 6, 7, 8, 6, 5], [2, 2, 2, 2, 2, 2]]

    def answered(row: int, tokens: list[int]) -> bool:  # row 0 and row 2 are done once they have written "d"
        return "d" in letters(tokens) and row != 3

    model = Dropping(scripts)
    kept = decode_tokens(model.feed, model.logits(), 5, {9}, answered=answered, keep_rows=model.keep_rows)
    assert [(a.tokens, a.stop_reason) for a in kept] == [
        ([1, 2, 3], "answered"), ([4, 9], "stop_token"), ([5, 6, 7, 8, 6], "max_new_tokens"),
        ([2, 2, 2, 2, 2], "max_new_tokens")]
    # row 1 leaves after its stop token (step 2), row 0 once answered (step 3); rows 2 and 3 run on alone
    assert model.kept == [[0, 2, 3], [1, 2]]
    assert model.fed == [{0: 1, 1: 4, 2: 5, 3: 2}, {0: 2, 2: 6, 3: 2}, {2: 7, 3: 2}, {2: 8, 3: 2}, {2: 6, 3: 2}]
    everyone = Scripted(scripts)  # without keep_rows every row is fed to the end, with the same answers
    assert [a.tokens for a in decode_tokens(everyone.feed, everyone.logits(0), 5, {9}, answered=answered)] == \
        [a.tokens for a in kept]
    assert everyone.fed[-1] == [5, 7, 6, 2]  # stopped rows fed to the end


def test_sampled_rows_keep_their_own_generators_when_others_leave():
    model = Markov()
    sampling = Sampling(temperature=1.0, seed=5)
    alone = [model.run([first], sampling)[0] for first in (0, 3, 7)]
    dropped = decode_tokens(model.feed, model.table[[0, 3, 7]], 12, (), sampling,
                            answered=lambda row, tokens: row == 1 and len(tokens) == 2, keep_rows=lambda kept: None)
    assert [a.tokens for a in dropped] == [alone[0], alone[1][:2], alone[2]]


def test_cut_at_stop_cuts_before_the_earliest_stop_string():
    assert cut_at_stop("one. two! three.", ["!", "."]) == "one"
    assert cut_at_stop("no stop here", ["!"]) == "no stop here"
    assert cut_at_stop("abc", []) == "abc"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stop_strings": [""], "text": letters}, "stop string must be non-empty"),
        ({"stop_strings": "cd", "text": letters}, "list of strings"),
        ({"stop_strings": ["cd"]}, "text(tokens) function"),
    ],
)
def test_bad_stop_strings_are_refused(kwargs, message):
    model = Scripted([[1, 2]])
    with pytest.raises(KVPError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode_tokens(model.feed, model.logits(0), 4, (), **kwargs)
    assert model.fed == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.5}, "temperature must be a number >= 0"),
        ({"temperature": float("nan")}, "temperature must be a number >= 0"),
        ({"temperature": float("inf")}, "temperature must be a number >= 0"),
        ({"temperature": "hot"}, "temperature must be a number >= 0"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_p": True}, r"top_p must be in \(0, 1\]"),
        ({"seed": 1.5}, "seed must be a whole number"),
        ({"seed": -1}, "seed must be a whole number"),
        ({"seed": True}, "seed must be a whole number"),
    ],
)
def test_bad_sampling_settings_are_one_line(kwargs, message):
    with pytest.raises(KVPError, match=message) as err:
        Sampling(**kwargs)
    assert len(str(err.value).splitlines()) == 1


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    probs = torch.tensor([0.125, 0.5, 0.25, 0.125])  # exact in binary: no rounding at the boundaries
    assert top_p_mask(probs, 0.5).tolist() == [False, True, False, False]
    assert top_p_mask(probs, 0.75).tolist() == [False, True, True, False]
    assert top_p_mask(probs, 0.76).tolist() == [True, True, True, False]  # of two equals, the lower id
    assert top_p_mask(probs, 1e-6).tolist() == [False, True, False, False]  # the likeliest is always kept
    assert top_p_mask(probs, 1.0).all()


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.99, 1.0])
def test_top_p_mask_matches_reference(top_p):
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 5, 17, generator=gen, dtype=torch.float64) * 2, dim=-1)
    probs[0, 0, :4] = probs[0, 0, 4]  # ties
    probs[0, 0] /= probs[0, 0].sum()
    assert torch.equal(top_p_mask(probs, top_p), top_p_mask_reference(probs, top_p))


def test_inverse_cdf_gives_each_token_its_share_of_the_unit_interval():
    uniforms = (torch.arange(1000) + 0.5) / 1000
    for probs in ([0.5, 0.0, 0.25, 0.25], [2.0, 0.0, 1.0, 1.0]):  # normalized or not
        tokens = inverse_cdf(torch.tensor(probs).expand(1000, -1), uniforms)
        assert torch.bincount(tokens, minlength=4).tolist() == [500, 0, 250, 250]


def test_sampled_tokens_follow_the_tempered_nucleus():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    sampling = Sampling(temperature=0.8, top_p=0.95, seed=1)
    probs = torch.softmax(logits[0] / 0.8, dim=-1)
    nucleus = top_p_mask(probs, 0.95)
    assert nucleus.tolist() == [True, True, True, False, False]
    (answer,) = decode_tokens(lambda step: logits, logits, 4000, (), sampling)
    freq = torch.bincount(torch.tensor(answer.tokens), minlength=5) / 4000
    assert torch.allclose(freq, probs * nucleus / (probs * nucleus).sum(), atol=0.03)
    assert freq[~nucleus].sum() == 0


def test_temperature_zero_is_greedy_and_small_temperatures_approach_it():
    model = Markov()
    greedy = model.run([0, 3, 7], GREEDY)
    walk = [[t] for t in (0, 3, 7)]
    for _ in range(11):
        walk = [row + [int(model.table[row[-1]].argmax())] for row in walk]
    assert greedy == [row[1:] + [int(model.table[row[-1]].argmax())] for row in walk]
    assert model.run([0, 3, 7], Sampling(temperature=0.0, seed=3)) == greedy
    assert model.run([0, 3, 7], Sampling(temperature=1e-3, seed=3)) == greedy
    assert model.run([0, 3, 7], Sampling(temperature=1.0, top_p=1e-6, seed=3)) == greedy  # a nucleus of one
    assert model.run([0, 3, 7], Sampling(temperature=2.0, seed=3)) != greedy


def test_the_same_seed_gives_the_same_tokens_and_a_row_samples_as_it_would_alone():
    model = Markov()
    sampling = Sampling(temperature=1.0, top_p=0.95, seed=7)
    batch = model.run([0, 3, 7, 3], sampling)
    assert batch == model.run([0, 3, 7, 3], sampling)
    assert batch == [model.run([first], sampling)[0] for first in (0, 3, 7, 3)]
    assert batch[1] == batch[3]  # equal rows see the same random numbers
    assert batch != model.run([0, 3, 7, 3], Sampling(temperature=1.0, top_p=0.95, seed=8))
    unseeded = Sampling(temperature=1.0)
    assert model.run([0], unseeded, 30) != model.run([0], unseeded, 30)  # a fresh draw each run
