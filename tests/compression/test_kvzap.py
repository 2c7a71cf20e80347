"""KVzap through kvpress's own KVzapPress: the scorers' scores are `KVzapPress.score`'s on the same hidden states,
with weights read from a kvpolicy KVzap directory (never the hub); a model without weights, weights trained for
another model and a cache whose entries' hidden states were not all recorded are refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from kvpress import KVzapPress
from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel

from kvpolicy.cli import main
from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import compress, prefill, rank
from kvpolicy.compression.scorers import ALL_QUERIES, make_scorer
from kvpolicy.errors import KVPError
from kvpolicy.policy import kvzap
from kvpolicy.policy.kvzap import save_kvzap

TEXT = ("The lighthouse keeper of Varn kept a ledger of every ship that passed the cape. In the spring of the flood "
        "year he counted forty-one schooners, nine steamers and a single balloon.")


def random_weights(root: Path, info, hidden: int, fingerprint: str | None = None,
                   thresholds: dict | None = None) -> Path:
    """A `kvp train-kvzap`-shaped directory (linear/ and mlp/) of random KVzap models for the model `info`, with the
    thresholded form's calibration when given."""
    for kind, hidden_dim in (("linear", None), ("mlp", 16)):
        torch.manual_seed(0)
        net = KVzapModel(KVzapConfig(input_dim=hidden, output_dim=info.n_kv_heads, n_modules=info.n_layers,
                                     hidden_dim=hidden_dim))
        extra = {"thresholds": thresholds} if thresholds else {}
        save_kvzap(root / kind, net, {"kind": kind, "model": {"name": info.name,
                                                              "fingerprint": fingerprint or info.fingerprint},
                                      **extra})
    return root


@pytest.fixture(scope="module")
def weights(smollm, tmp_path_factory) -> Path:
    return random_weights(tmp_path_factory.mktemp("kvzap"), smollm.info, smollm.model.config.hidden_size)


@pytest.mark.model
@pytest.mark.parametrize("name, kind", [("kvzap_linear", "linear"), ("kvzap_mlp", "mlp")])
def test_scores_are_kvpress_kvzap_press_on_the_same_hidden_states(smollm, weights, name, kind):
    state, _ = prefill(smollm, smollm.encode(TEXT), record_queries=ALL_QUERIES)
    ours = rank(smollm, state, make_scorer(name, weights=str(weights)))
    press = KVzapPress(model_type=kind)
    press.kvzap_model = KVzapModel.from_pretrained(weights / kind, use_safetensors=True)
    for idx, layer in enumerate(smollm.layers):
        keys, values = state.layer(idx)
        theirs = press.score(layer.self_attn, state.recorded[idx].hidden_states, keys, values, None, {})
        assert ours[idx].shape == keys.shape[:3] and torch.allclose(ours[idx], theirs, atol=1e-6), f"layer {idx}"


@pytest.mark.model
def test_weights_of_another_model_and_a_partly_recorded_cache_are_refused(smollm, weights, tmp_path):
    info = smollm.info
    other = random_weights(tmp_path, info, smollm.model.config.hidden_size, fingerprint="f" * 16)
    state, _ = prefill(smollm, smollm.encode(TEXT), record_queries=ALL_QUERIES)
    with pytest.raises(KVPError, match=f"trained for {info.name} \\(fingerprint f+\\), not {info.name}"):
        rank(smollm, state, make_scorer("kvzap_mlp", weights=str(other)))
    ids = smollm.encode(TEXT)
    state, _ = prefill(smollm, ids[:, :10])
    prefill(smollm, ids[:, 10:], state, record_queries=ALL_QUERIES)
    with pytest.raises(KVPError, match=f"only the latest {ids.shape[1] - 10} of the {ids.shape[1]} cached entries"):
        rank(smollm, state, make_scorer("kvzap_linear", weights=str(weights)))


@pytest.mark.model
def test_a_model_without_kvzap_weights_is_one_line(smollm, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kvzap, "SHIPPED_DIR", tmp_path)
    assert main(["generate", TEXT, "--scorer", "kvzap_mlp", "--budget", "32", "--max-new-tokens", "1"]) == 1
    err = capsys.readouterr().err
    assert err == ("kvp generate: error: no KVzap weights for model smollm2-135m (shipped: none); train them with "
                   "`kvp train-kvzap --model smollm2-135m --source mix --split train --n 64 --out DIR` and pass "
                   "weights=DIR\n")


@pytest.mark.model
def test_the_weights_shipped_for_smollm2_rank_its_cache(smollm):
    state, _ = prefill(smollm, smollm.encode(TEXT), record_queries=ALL_QUERIES)
    scores = rank(smollm, state, make_scorer("kvzap_mlp"))
    assert len(scores) == smollm.info.n_layers and scores[0].shape == state.layer(0)[0].shape[:3]
    assert all(s.isfinite().all() and s.std() > 0 for s in scores)


@pytest.mark.model
def test_the_thresholded_form_keeps_its_window_and_what_reaches_the_threshold(smollm, weights, tmp_path, capsys):
    """Calibrated on this very prompt's scores outside the window, the thresholded MLP keeps the budget on average
    over heads and layers, each head what its scores give it; the newest `window` entries are kept in every head."""
    state, _ = prefill(smollm, smollm.encode(TEXT), record_queries=ALL_QUERIES)
    T, window, budget = state.length, 16, 28  # the window covers the 16 recent tokens; 4 sinks are kept too
    scores = torch.stack([s[0] for s in rank(smollm, state, make_scorer("kvzap_mlp", weights=str(weights)))])
    outside = scores[..., 4: T - window].flatten().double()
    quantiles = outside.quantile(torch.linspace(0, 1, 1001, dtype=torch.float64)).tolist()
    calibrated = random_weights(tmp_path / "t", smollm.info, smollm.model.config.hidden_size,
                                thresholds={"window": window, "quantiles": quantiles})
    small = compress(smollm, state, make_scorer("kvzap_mlp_threshold", weights=str(calibrated)), Budget(tokens=budget))
    assert small.masks is not None and small.attended() == pytest.approx(budget, abs=0.5)
    counts = torch.stack([m.sum(-1)[0] for m in small.masks])  # (L, H)
    assert int(counts.max()) > int(counts.min())
    fraction = (budget - window - 4) / (T - window - 4)
    tau = float(np.interp(1 - fraction, np.linspace(0, 1, len(quantiles)), quantiles))  # of the stored table
    for layer, (positions, mask) in enumerate(zip(small.positions, small.masks)):
        for head in range(positions.shape[1]):
            kept = set(positions[0, head][mask[0, head]].tolist())
            assert set(range(T - window, T)) | set(range(4)) <= kept  # the window and the sinks
            above = (scores[layer, head, 4: T - window] >= tau).nonzero() + 4
            assert set(above.flatten().tolist()) <= kept
    with pytest.raises(KVPError, match="carry no threshold calibration"):
        rank(smollm, state, make_scorer("kvzap_mlp_threshold", weights=str(weights)))
    assert main(["sweep", "--out", str(tmp_path / "r.jsonl"), "--scorer", f"kvzap_mlp_threshold:{calibrated}",
                 "--budget", "64", "--task", "ruler:niah_single_1", "--context", "256", "--n", "1"]) == 1
    assert "keeps its newest 128 entries, more than a budget of 64 per head" in capsys.readouterr().err


def test_kvzap_like_kvzip_ranks_only_a_whole_prefill():
    """A sweep skips both under multi-turn dialogue and in bounded streams, whose later rankings see a cut cache."""
    from kvpolicy.evaluation.bounded_stream import StreamTask
    from kvpolicy.evaluation.lineup import make_contenders
    from kvpolicy.evaluation.perplexity import DialogueTask

    contenders = make_contenders(["kvzap_mlp", "kvzip", "knorm"])
    assert [c.whole_prefill for c in contenders] == [True, True, False]
    dialogue = DialogueTask(name="d", family="f", data="x", metric="perplexity", protocols=("prompt-once",
                                                                                              "multi-turn"), sized=True)
    assert [dialogue.supports(c, "multi-turn") for c in contenders] == [False, False, True]
    assert all(dialogue.supports(c, "prompt-once") for c in contenders)
    stream = StreamTask(name="s", family="f", data="x", metric="perplexity", protocols=("bounded",), sized=True)
    assert [stream.supports(c, "bounded") for c in contenders] == [False, False, True]
