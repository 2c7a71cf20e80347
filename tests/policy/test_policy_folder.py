"""A policy is a Hugging Face-style folder: config.json with the Hub's keys, model.safetensors, a README.md model card
rendered from the config; `save_pretrained` writes one, `load_policy` and `KVPolicyPress.from_pretrained` read a
folder or a Hub id (through the Hub's own cache, offline here), and a folder of the first format loads and converts
byte for byte."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from safetensors.torch import load_file

from kvpolicy.cli import main
from kvpolicy.compression.press import KVPolicyPress
from kvpolicy.compression.scorers.learned import load_policy
from kvpolicy.errors import KVPError
from kvpolicy.policy import checkpoint as ckpt
from kvpolicy.policy.network import PolicyConfig, PolicyNet

SHAPE = dict(n_layers=2, n_kv_heads=2, head_dim=16)
MODEL = {"name": "smollm2-135m", "fingerprint": "abcd", **SHAPE}
HELD_OUT = {"command": "kvp fit --model smollm2-135m --out DIR", "unit": "Whole-ranking cost (1 is the oracle's).",
            "corpora": [{"corpus": "dialogue", "prompts": 6, "kvp": 1.598, "interval": [1.483, 1.761],
                         "best_attention_free": "KNorm", "best_attention_free_cost": 3.791}]}


def _policy(path, **config):
    net = PolicyNet(PolicyConfig(**SHAPE, hidden=8))
    return ckpt.save_checkpoint(path, {"model": MODEL, "policy": net.config.to_dict(), **config}, net.state_dict())


def test_a_checkpoint_is_a_hub_folder_with_a_card_rendered_from_its_config(tmp_path):
    _policy(tmp_path / "p", traces={"train": {"manifest_hash": "h", "source": "mix", "context_tokens": 2048,
                                              "n_samples": 64, "split": "train", "data": "a fixed mix"}})
    config = json.loads((tmp_path / "p" / ckpt.CONFIG).read_text())
    assert config["model_type"] == "kvpolicy" and config["architectures"] == ["PolicyNet"]
    assert config["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and config["format"] == ckpt.FORMAT
    card = (tmp_path / "p" / ckpt.CARD).read_text()
    assert card.startswith("---\nlibrary_name: kvpolicy\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert "# KVP eviction policy for smollm2-135m" in card and "64 `mix` prompts (a fixed mix) at 2048 tokens" in card
    assert "Held-out ranking cost\n\nNot measured for this folder" in card and "(this folder has none)" in card
    _policy(tmp_path / "q", held_out=HELD_OUT)  # measured: the table, with its interval and the best heuristic
    assert "| dialogue | 6 | 1.598 [1.483, 1.761] | KNorm 3.791 |" in (tmp_path / "q" / ckpt.CARD).read_text()
    bad = {**HELD_OUT, "corpora": [{"corpus": "dialogue"}]}
    with pytest.raises(KVPError, match=r"held_out: field .corpora\[0\].prompts. is missing"):  # before any write
        _policy(tmp_path / "r", held_out=bad)
    assert not (tmp_path / "r").exists()


def test_the_card_of_a_hybrid_models_policy_names_the_layers_it_cuts(tmp_path):
    from kvpolicy.policy.card import render_card

    _policy(tmp_path / "p")
    config = json.loads((tmp_path / "p" / ckpt.CONFIG).read_text())
    assert "(2 layers, 2 KV heads" in render_card(config)
    config["model"]["layer_windows"] = [512, None, 512, None]
    assert ("(2 full-attention layers evicted (1, 3) of 4; the 2 others keep their sliding window of 512 tokens, 2 KV "
            "heads") in render_card(config)
    assert "the 2 sliding-window layers keep their last 511 entries whatever the budget" in render_card(config)


def test_save_pretrained_writes_the_deployable_folder_byte_for_byte(tmp_path):
    _policy(tmp_path / "p")
    (tmp_path / "p" / ckpt.HISTORY).write_text("")  # a training run's extras stay behind
    policy = load_policy(tmp_path / "p")
    assert policy.save_pretrained(tmp_path / "out") == tmp_path / "out"
    assert sorted(os.listdir(tmp_path / "out")) == sorted([ckpt.CARD, ckpt.CONFIG, ckpt.WEIGHTS])
    assert (tmp_path / "out" / ckpt.WEIGHTS).read_bytes() == (tmp_path / "p" / ckpt.WEIGHTS).read_bytes()
    again = load_policy(tmp_path / "out")
    assert again.identity()["sha256"] == policy.identity()["sha256"]
    press = KVPolicyPress.from_pretrained(str(tmp_path / "out"), compression_ratio=0.5, recent=8)
    assert press.scorer.identity()["sha256"] == policy.identity()["sha256"] and press.recent == 8
    (tmp_path / "p" / ckpt.WEIGHTS).write_bytes(b"replaced")
    with pytest.raises(KVPError, match="changed on disk since this policy was loaded"):
        policy.save_pretrained(tmp_path / "other")


def _first_format(path):
    """The folder of a policy as the first format wrote it: policy.safetensors, format 1, no card."""
    _policy(path)
    config = json.loads((path / ckpt.CONFIG).read_text())
    (path / ckpt.WEIGHTS).rename(path / ckpt.LEGACY_WEIGHTS)
    (path / ckpt.CARD).unlink()
    for key in ("model_type", "architectures", "base_model"):
        del config[key]
    (path / ckpt.CONFIG).write_text(json.dumps(config | {"format": ckpt.LEGACY_FORMAT}))
    return config["weights_sha256"]


def test_a_folder_of_the_first_format_loads_and_converts_byte_for_byte(tmp_path, capsys):
    sha = _first_format(tmp_path / "old")
    weights = load_file(str(tmp_path / "old" / ckpt.LEGACY_WEIGHTS))
    assert load_policy(tmp_path / "old").identity()["sha256"] == sha
    assert main(["policies", "--convert", str(tmp_path / "old"), "--out", str(tmp_path / "new")]) == 0
    assert f"converted {tmp_path / 'old'} -> {tmp_path / 'new'}" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "new")) == sorted([ckpt.CARD, ckpt.CONFIG, ckpt.WEIGHTS])
    assert hashlib.sha256((tmp_path / "new" / ckpt.WEIGHTS).read_bytes()).hexdigest() == sha
    assert load_policy(tmp_path / "new").identity()["sha256"] == sha
    assert main(["policies", "--convert", str(tmp_path / "old")]) == 0  # in place
    assert not (tmp_path / "old" / ckpt.LEGACY_WEIGHTS).exists()
    assert load_file(str(tmp_path / "old" / ckpt.WEIGHTS)).keys() == weights.keys()
    assert main(["policies", "--out", str(tmp_path / "x")]) == 1
    assert "--out says where --convert writes" in capsys.readouterr().err


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An offline Hugging Face Hub cache at tmp_path/hub: what `huggingface-cli download` leaves behind."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read once at import: the variables come too late
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_hub_id_loads_from_the_hub_cache_and_offline_misses_are_one_line(tmp_path, offline_hub):
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--someone--smollm2-kvp"
    _policy(repo / "snapshots" / revision, held_out=HELD_OUT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    policy = load_policy("someone/smollm2-kvp")
    assert policy.identity()["checkpoint"] == "someone/smollm2-kvp"
    assert KVPolicyPress.from_pretrained("someone/smollm2-kvp").scorer.identity() == policy.identity()
    with pytest.raises(KVPError, match=r"cannot fetch policy 'someone/missing' from the Hugging Face Hub .*"
                                       r"huggingface-cli download someone/missing --local-dir DIR"):
        load_policy("someone/missing")
