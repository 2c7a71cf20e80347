"""KVzap weights on disk: kvpress's own KVzapModel format (fp16), with a kvpolicy section that names the model they
were trained for; damaged, mismatched or missing weights are refused in one line."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel
from safetensors.torch import load_file

from kvpolicy.errors import KVPError
from kvpolicy.policy import kvzap
from kvpolicy.policy.kvzap import (kvzap_directory, kvzap_thresholds, kvzap_weights, load_kvzap, save_kvzap, ship_kvzap,
                                   shipped_kvzap)

MODEL = SimpleNamespace(name="tiny", fingerprint="0123456789abcdef")


def random_kvzap(hidden_dim: int | None) -> KVzapModel:
    torch.manual_seed(0)
    return KVzapModel(KVzapConfig(input_dim=8, output_dim=2, n_modules=3, hidden_dim=hidden_dim)).eval()


def saved(path, kind: str, model=MODEL):
    net = random_kvzap(None if kind == "linear" else 16)
    save_kvzap(path, net, {"kind": kind, "model": {"name": model.name, "fingerprint": model.fingerprint},
                           "command": "kvp train-kvzap ...", "r2_per_layer": [0.5, 0.6, 0.7]})
    return net


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_round_trip_in_kvpress_format_fp16(tmp_path, kind):
    net = saved(tmp_path / kind, kind)
    assert {t.dtype for t in load_file(str(tmp_path / kind / "model.safetensors")).values()} == {torch.float16}
    x = torch.randn(5, 3, 8)
    theirs = KVzapModel.from_pretrained(tmp_path / kind, use_safetensors=True)  # kvpress reads it as it is
    ours = load_kvzap(tmp_path / kind, MODEL, kind)
    expected = net.half().float()(x)
    assert torch.allclose(ours(x), expected, atol=1e-6)
    assert torch.allclose(theirs.float()(x), expected, atol=1e-6)
    section = json.loads((tmp_path / kind / "config.json").read_text())["kvpolicy"]
    assert section["model"] == {"name": "tiny", "fingerprint": MODEL.fingerprint} and section["kind"] == kind


def test_weights_of_another_model_another_kind_or_damaged_are_refused(tmp_path):
    saved(tmp_path / "mlp", "mlp")
    other = SimpleNamespace(name="other", fingerprint="f" * 16)
    with pytest.raises(KVPError, match="trained for tiny .* not other .*kvp train-kvzap --model other"):
        load_kvzap(tmp_path / "mlp", other)
    with pytest.raises(KVPError, match="hold the mlp model, not the linear one"):
        load_kvzap(tmp_path / "mlp", MODEL, "linear")
    weights = tmp_path / "mlp" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(KVPError, match="does not match the hash"):
        load_kvzap(tmp_path / "mlp")


def test_shipped_weights_are_found_per_model_and_missing_ones_say_how_to_train(tmp_path, monkeypatch):
    monkeypatch.setattr(kvzap, "SHIPPED_DIR", tmp_path / "shipped")
    with pytest.raises(KVPError) as err:
        kvzap_directory("tiny", "mlp")
    assert str(err.value) == ("no KVzap weights for model tiny (shipped: none); train them with `kvp train-kvzap "
                              "--model tiny --source mix --split train --n 64 --out DIR` and pass weights=DIR")
    run = tmp_path / "run"
    for kind in ("linear", "mlp"):
        saved(run / kind, kind)
    assert kvzap_directory("tiny", "mlp", run) == run / "mlp"  # a run's directory, or the kind's itself
    assert kvzap_directory("tiny", "mlp", run / "mlp") == run / "mlp"
    assert ship_kvzap(run) == tmp_path / "shipped" / "tiny"
    assert shipped_kvzap() == {"tiny": tmp_path / "shipped" / "tiny"}
    assert kvzap_directory("tiny", "linear") == tmp_path / "shipped" / "tiny" / "linear"
    load_kvzap(kvzap_directory("tiny", "linear"), MODEL, "linear")
    sha = json.loads((run / "mlp" / "config.json").read_text())["kvpolicy"]["weights_sha256"]
    assert kvzap_weights("mlp") == {"tiny": {"sha256": sha, "seed": None}} == kvzap_weights("mlp", run)


def test_the_shipped_weights_are_small_fp16_and_say_how_they_were_made():
    shipped = shipped_kvzap()
    assert set(shipped) == {"smollm2-135m", "qwen2.5-0.5b"}
    for model, directory in shipped.items():
        for kind in ("linear", "mlp"):
            weights = directory / kind / "model.safetensors"
            assert weights.stat().st_size < 4e6, f"{weights} is over 4 MB"
            section = json.loads((directory / kind / "config.json").read_text())["kvpolicy"]
            assert section["kind"] == kind and section["model"]["name"] == model
            assert section["command"].startswith(f"kvp train-kvzap --model {model} --source mix --split train")
            assert section["seed"] == (0 if kind == "mlp" else None) and "--fit-seed 0 " in section["command"]
            net = load_kvzap(directory / kind, kind=kind)
            assert len(section["r2_per_layer"]) == net.config.n_modules
            assert {t.dtype for t in load_file(str(weights)).values()} == {torch.float16}
            window, quantiles = kvzap_thresholds(directory / kind)  # the thresholded form works right after install
            assert window == 128 and len(quantiles) == 1001 and list(quantiles) == sorted(quantiles)
