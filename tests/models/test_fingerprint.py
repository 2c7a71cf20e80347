"""Fingerprints: Hugging Face models are fingerprinted from their files, each file hashed once and remembered;
a model handed to kvpress is recognised however it was loaded."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvpolicy.models import fingerprint as fp
from kvpolicy.models.loader import identify


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(config).eval()


def test_files_are_hashed_once_and_the_fingerprint_follows_the_weights(tmp_path, monkeypatch):
    model_dir, memo = tmp_path / "m", tmp_path / "memo.json"
    tiny_model().save_pretrained(model_dir)
    hashed = []
    real = fp.sha256_file
    monkeypatch.setattr(fp, "sha256_file", lambda path: hashed.append(path) or real(path))
    config = tiny_model().config.to_dict()
    first = fp.files_fingerprint(model_dir, config, memo)
    assert len(hashed) == 1 and memo.is_file()
    assert fp.files_fingerprint(model_dir, config, memo) == first and len(hashed) == 1  # remembered, not rehashed
    tiny_model(seed=1).save_pretrained(model_dir)  # other weights in the same place
    assert fp.files_fingerprint(model_dir, config, memo) != first and len(hashed) == 2


def test_a_hub_cache_blob_is_named_by_its_hash(tmp_path):
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    link = tmp_path / "model.safetensors"
    link.symlink_to(blob)
    assert fp.file_digest(link, tmp_path / "memo.json") == "ab" * 32
    assert not (tmp_path / "memo.json").exists()  # nothing hashed, nothing to remember


def test_identify_a_model_however_it_was_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("KVP_CACHE_DIR", str(tmp_path / "cache"))
    in_memory = tiny_model()
    assert identify(in_memory).fingerprint == fp.weights_fingerprint(in_memory)
    in_memory.save_pretrained(tmp_path / "m")
    from_disk = LlamaForCausalLM.from_pretrained(tmp_path / "m")
    info = identify(from_disk)
    assert info.fingerprint == fp.files_fingerprint(tmp_path / "m", from_disk.config.to_dict(),
                                                    tmp_path / "cache" / "fingerprints.json")
    assert (info.n_layers, info.n_kv_heads, info.head_dim) == (2, 1, 8)


@pytest.mark.model
def test_a_loaded_model_carries_its_identity(smollm):
    assert identify(smollm.model) is smollm.info


@pytest.mark.model
def test_a_model_read_from_the_converted_cache_is_the_registered_one(smollm):
    from kvpolicy.models.loader import cache_root

    direct = LlamaForCausalLM.from_pretrained(cache_root() / "smollm2-135m")  # as a kvpress user might load it
    assert identify(direct) == smollm.info
