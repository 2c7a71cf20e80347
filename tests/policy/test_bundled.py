"""Bundled policies: written from a checkpoint in fp16 with how they were made, found by model name everywhere a
policy is named (make_scorer, load_policy, KVPolicyPress, kvp generate --scorer kvp), refused on another model."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from kvpolicy.cli import main
from kvpolicy.compression.press import KVPolicyPress
from kvpolicy.compression.scorers import make_scorer
from kvpolicy.compression.scorers.learned import KVPScorer, load_policy
from kvpolicy.errors import KVPError
from kvpolicy.policy import bundled
from kvpolicy.policy.checkpoint import WEIGHTS, OtherWeightsWarning, load_checkpoint

pytestmark = pytest.mark.model

MADE_BY = {"commands": ["kvp traces --source mix ...", "kvp train ..."], "steps": 12}


@pytest.fixture
def shipped(trained_policy, tmp_path, monkeypatch):
    """The trained test policy bundled into a temporary weights directory."""
    monkeypatch.setattr(bundled, "BUNDLED_DIR", tmp_path / "weights")
    return bundled.bundle(trained_policy, MADE_BY)


def test_a_bundled_policy_is_fp16_and_says_how_it_was_made(trained_policy, shipped, smollm):
    assert shipped.name == "smollm2-135m" and bundled.bundled_policies() == {"smollm2-135m": shipped}
    config = json.loads((shipped / "config.json").read_text())
    assert config["bundle"]["commands"] == MADE_BY["commands"] and config["bundle"]["steps"] == 12
    assert config["bundle"]["model_fingerprint"] == smollm.info.fingerprint
    original, small = load_checkpoint(trained_policy), load_checkpoint(shipped)
    assert (shipped / WEIGHTS).stat().st_size < 0.6 * (trained_policy / WEIGHTS).stat().st_size
    for name, tensor in original.policy.state_dict().items():
        assert torch.allclose(small.policy.state_dict()[name], tensor, atol=1e-2, rtol=1e-3), name


def test_bundled_names_work_wherever_a_policy_is_named(shipped, smollm):
    by_name = make_scorer("kvp:smollm2-135m")
    assert isinstance(by_name, KVPScorer) and by_name.identity()["bundled"]
    assert load_policy(model=smollm).identity()["sha256"] == by_name.identity()["sha256"]
    assert KVPolicyPress(compression_ratio=0.5, scorer="kvp:smollm2-135m").scorer.identity()["bundled"]
    with pytest.raises(KVPError, match="kvp:MODEL"):
        make_scorer("kvp")
    with pytest.raises(KVPError, match=r"no bundled policy for this model \('qwen2.5-0.5b'"):
        bundled.bundled_path("qwen2.5-0.5b")


def test_a_bundled_policy_serves_other_weights_of_its_model_with_a_warning_and_refuses_other_models(shipped, smollm):
    """Compatibility is by architecture and cache shape: other weights of the model (a fine-tune, another copy) are
    a warning, which check_weights=False silences; another cache shape or architecture family is refused."""
    other_weights = dataclasses.replace(smollm.info, fingerprint="0123456789abcdef")
    with pytest.warns(OtherWeightsWarning, match="other weights .*may rank worse"):
        assert load_policy("smollm2-135m", model=other_weights).identity()["bundled"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_policy("smollm2-135m", model=other_weights, check_weights=False)
        load_policy("smollm2-135m", model=smollm)  # its own weights: nothing to say
    with pytest.raises(KVPError, match=r"trained for smollm2-135m, whose cache has .* \(30, 3, 64\); .*kvp fit"):
        load_policy("smollm2-135m", model=dataclasses.replace(other_weights, n_layers=12))
    with pytest.raises(KVPError, match="trained for a llama model .* is a qwen2 model"):
        load_policy("smollm2-135m", model=dataclasses.replace(other_weights, family="qwen2"))


def test_kvp_generate_with_plain_kvp_uses_the_models_bundled_policy(shipped, capsys):
    assert main(["generate", "The code is 4721. Remember it.", "--question", "What is the code?", "--scorer", "kvp",
                 "--budget", "24", "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scorer"]["name"] == "kvp" and out["scorer"]["bundled"] and out["cache_tokens_compressed"] == 24


def test_kvp_policies_bundles_and_lists(trained_policy, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bundled, "BUNDLED_DIR", tmp_path / "weights")
    assert main(["policies"]) == 0 and "no bundled policies" in capsys.readouterr().out
    assert main(["policies", "--bundle", str(trained_policy), "--made-by", "kvp traces --source mix",
                 "--made-by", "kvp train"]) == 0
    out = capsys.readouterr().out
    assert "kvp:smollm2-135m" in out and "$ kvp traces --source mix" in out and "$ kvp train" in out
    assert main(["policies", "--made-by", "x"]) == 1
