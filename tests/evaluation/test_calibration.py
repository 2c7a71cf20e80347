"""Calibrating KVP's scores onto one scale across heads: the fit, the map, the held-out measure, the command, and
the allocation modes it opens to the policy."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from kvpolicy.compression.allocation import UNIFORM, Global, Layerwise
from kvpolicy.compression.budget import Budget
from kvpolicy.errors import KVPError
from kvpolicy.policy.calibration import Calibration, rank_edges, relative_ranks
from kvpolicy.evaluation.calibration.attention_lost import attention_lost, attention_lost_reference
from kvpolicy.training.calibrate import fit_curve, fit_curve_reference


def random_samples(lengths=(40, 57, 33), L=2, H=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    scores = [torch.randn(L, H, T, generator=generator) for T in lengths]
    # utility that follows the scores in some heads more than in others, so that the curves differ
    slopes = torch.tensor([0.5, 1.0, 2.0]).view(1, H, 1)
    utility = [(s * slopes).exp() * torch.rand(L, H, s.shape[-1], generator=generator) for s in scores]
    return scores, utility


def test_fit_curve_equals_the_slow_reference_and_is_non_increasing():
    scores, utility = random_samples()
    edges = rank_edges(8)
    fast, slow = fit_curve(scores, utility, edges, 4, 6), fit_curve_reference(scores, utility, edges, 4, 6)
    assert torch.allclose(fast, slow, rtol=1e-5)
    assert bool((fast[..., 1:] <= fast[..., :-1]).all())
    assert not torch.allclose(fast[0, 0], fast[0, 2])  # heads get curves of their own (so the test can fail)


def test_the_calibrated_scores_keep_each_heads_ranking_exactly():
    scores, utility = random_samples(lengths=(2000,), seed=1)
    calibration = Calibration(rank_edges(), fit_curve(scores, utility, rank_edges()), {})
    flat = Calibration(rank_edges(), torch.ones(2, 3, 32), {})  # every token of every bin the same value
    for c in (calibration, flat):
        mapped = c.apply(1, scores[0][1][None])
        assert mapped.dtype == torch.float64
        assert torch.equal(mapped.argsort(dim=-1), scores[0][1][None].argsort(dim=-1))


def test_relative_ranks_put_the_best_score_first():
    q = relative_ranks(torch.tensor([[0.1, 3.0, -1.0, 2.0]]))
    assert torch.allclose(q, torch.tensor([[2.5, 0.5, 3.5, 1.5]]) / 4)


def test_a_calibration_refuses_what_it_cannot_use():
    with pytest.raises(KVPError, match="non-increasing"):
        Calibration(rank_edges(2), torch.tensor([[[1.0, 2.0]]]), {})
    with pytest.raises(KVPError, match="bins"):
        Calibration(rank_edges(3), torch.ones(1, 1, 2), {})
    good = Calibration(rank_edges(2), torch.tensor([[[2.0, 1.0]]]), {"traces": "x"})
    assert Calibration.from_config(good.to_config(), (1, 1), "cfg").sha256 == good.sha256
    with pytest.raises(KVPError, match="is for"):
        Calibration.from_config(good.to_config(), (2, 1), "cfg")
    with pytest.raises(KVPError, match="unreadable"):
        Calibration.from_config({"edges": [0, 1]}, (1, 1), "cfg")


@pytest.mark.parametrize("allocation", [UNIFORM, Layerwise(), Global()], ids=["head", "layer", "model"])
@pytest.mark.parametrize("budget", [Budget(tokens=12, sinks=2, recent=4), Budget(ratio=0.5, sinks=2, recent=4)])
def test_attention_lost_equals_the_slow_reference(allocation, budget):
    scores, utility = random_samples(lengths=(40,), L=3, seed=2)
    keys = scores[0] * torch.tensor([1.0, 2.0, 4.0]).view(3, 1, 1)  # layers on other scales: the modes differ
    fast = attention_lost(keys, utility[0], budget, allocation)
    assert fast == pytest.approx(attention_lost_reference(keys, utility[0], budget, allocation), abs=1e-9)
    assert 0 < fast < 1


def test_the_oracle_loses_least_when_the_whole_model_shares_the_budget():
    _, utility = random_samples(lengths=(64,), L=3, seed=3)
    u = utility[0] * torch.tensor([0.1, 1.0, 10.0]).view(3, 1, 1)  # layers whose attention is worth more
    lost = {name: attention_lost(u, u, Budget(tokens=20, sinks=2, recent=4), a) for name, a in
            (("head", UNIFORM), ("layer", Layerwise()), ("model", Global()))}
    assert lost["model"] <= lost["layer"] <= lost["head"] and lost["model"] < lost["head"]


@pytest.mark.model
def test_kvp_calibrate_opens_the_allocation_modes_to_a_policy(trained_policy, tmp_path, smollm):
    from kvpolicy.cli import main
    from kvpolicy.compression.engine import generate
    from kvpolicy.compression.scorers import make_scorer
    from kvpolicy.compression.scorers.learned import KVPScorer

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_policy, ckpt)
    weights = (ckpt / "model.safetensors").read_bytes()
    with pytest.raises(KVPError, match="kvp calibrate"):
        make_scorer(f"kvp:{ckpt}@model")
    traces = str(trained_policy.parent / "traces")
    assert main(["calibrate", "--policy", str(ckpt), "--traces", traces, "--held-out", traces,
                 "--budget", "48"]) == 0
    assert (ckpt / "model.safetensors").read_bytes() == weights  # the weights are untouched
    config = json.loads((ckpt / "config.json").read_text())
    assert config["calibration"]["fit"]["held_out"]["samples"] == 3
    assert set(config["calibration"]["fit"]["held_out"]["attention_lost"]) >= {"KVP (head)", "KVP (model)"}
    plain, moved = KVPScorer(str(ckpt)), make_scorer(f"kvp:{ckpt}@model")
    assert moved.identity() == {**plain.identity(), "calibration_sha256": moved.inner.comparable_identity()[
        "calibration_sha256"], "allocation": "model"}
    context = " ".join(["The harbour opened at dawn and the fishing boats left one by one."] * 12)
    result = generate(smollm, context, "When did the harbour open?", moved, Budget(tokens=48), max_new_tokens=4)
    uniform = generate(smollm, context, "When did the harbour open?", plain, Budget(tokens=48), max_new_tokens=4)
    assert result.cache_bytes_compressed == uniform.cache_bytes_compressed  # equal memory, spread otherwise
    assert result.cache_tokens_compressed == 48


def test_a_policy_whose_config_cannot_be_written_is_refused_before_the_fit(public_tmp, as_nobody, capsys,
                                                                           monkeypatch):
    import importlib

    from kvpolicy.cli import main
    from kvpolicy.training import calibrate
    from kvpolicy.training.synthetic import SyntheticTraces, write_synthetic_traces

    traces, ckpt = public_tmp / "traces", public_tmp / "ckpt"
    write_synthetic_traces(traces, SyntheticTraces(3, length=64, n_layers=2, n_kv_heads=2, head_dim=16))
    assert main(["train", "--traces", str(traces), "--out", str(ckpt), "--steps", "2", "--no-compile"]) == 0
    for module in ("evaluation.calibration.cli", "evaluation.calibration.attention_lost", "evaluation.lineup",
                   "policy.bundled", "traces.union", "intervals"):  # as root: nobody cannot read the stdlib
        importlib.import_module(f"kvpolicy.{module}")
    (ckpt / "config.json").chmod(0o444)
    ckpt.chmod(0o555)
    monkeypatch.setattr(calibrate, "fit_calibration", lambda *a, **k: pytest.fail("fitted before refusing"))
    with as_nobody():
        code = main(["calibrate", "--policy", str(ckpt), "--traces", str(traces)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "config.json" in err, err
