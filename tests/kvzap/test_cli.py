"""`kvp train-kvzap` end to end on SmolLM2 at tiny sizes: kvpress-loadable weights with their held-out R², a rerun
that collects nothing again, another fit seed on the same --data that collects nothing either, and a data directory
made for another model refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from kvpress.presses.kvzap_press import KVzapModel
from safetensors.torch import load_file

from kvpolicy.cli import main
from kvpolicy.kvzap.collect import LOG_FLOOR

TINY = ["--model", "smollm2-135m", "--source", "mix", "--split", "train", "--n", "2", "--context", "256",
        "--val-n", "1", "--tokens-per-prompt", "50", "--mlp-epochs", "1", "--mlp-hidden", "16"]


@pytest.mark.model
def test_train_kvzap_end_to_end_resumes_and_refuses_another_models_directory(smollm, tmp_path, capsys):
    out = tmp_path / "kvzap"
    assert main(["train-kvzap", *TINY, "--out", str(out)]) == 0
    info = smollm.info
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["collected_now"] == {"train": 2, "val": 1} and metrics["data"]["tokens"] == 100
    for kind in ("linear", "mlp"):
        model = KVzapModel.from_pretrained(out / kind, use_safetensors=True)
        assert (model.config.n_modules, model.config.output_dim) == (info.n_layers, info.n_kv_heads)
        section = json.loads((out / kind / "config.json").read_text())["kvpolicy"]
        assert section["model"] == {"name": info.name, "fingerprint": info.fingerprint}
        assert section["command"].startswith("kvp train-kvzap --model smollm2-135m --source mix --split train --n 2")
        assert len(section["r2_per_layer"]) == info.n_layers == len(metrics["kinds"][kind]["r2_per_layer"])
    assert metrics["kinds"]["linear"]["train_r2_mean"] > 0.5  # 100 tokens, 576 inputs: in-sample fits well
    data = load_file(str(out / "data" / "train" / "00000.safetensors"))
    assert data["inputs"].shape == (50, info.n_layers, 576) and data["inputs"].dtype == torch.float16
    assert data["targets"].shape == (50, info.n_layers, info.n_kv_heads) and data["positions"].min() >= 4
    assert (data["targets"] > torch.tensor(LOG_FLOOR).log()).all()  # the reconstruction scored every one
    assert "KVzap for smollm2-135m" in capsys.readouterr().out

    before = {p: p.stat().st_mtime_ns for p in (out / "data").rglob("*.safetensors")}
    assert main(["train-kvzap", *TINY, "--kind", "linear", "--out", str(out)]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["collected_now"] == {"train": 0, "val": 0} and set(again["kinds"]) == {"linear", "mlp"}
    assert {p: p.stat().st_mtime_ns for p in (out / "data").rglob("*.safetensors")} == before

    seed1 = tmp_path / "kvzap-s1"
    assert main(["train-kvzap", *TINY, "--kind", "mlp", "--fit-seed", "1", "--data", str(out / "data"),
                 "--out", str(seed1)]) == 0
    shared = json.loads((seed1 / "metrics.json").read_text())
    assert shared["collected_now"] == {"train": 0, "val": 0} and shared["data"] == again["data"]
    assert "--seed 0 --fit-seed 1" in shared["command"] and not (seed1 / "data").exists()
    assert {p: p.stat().st_mtime_ns for p in (out / "data").rglob("*.safetensors")} == before
    capsys.readouterr()

    run = json.loads((out / "data" / "run.json").read_text())
    run["model"] |= {"name": "other-model", "fingerprint": "f" * 16}
    (out / "data" / "run.json").write_text(json.dumps(run))
    assert main(["train-kvzap", *TINY, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"holds KVzap data of other-model (fingerprint {'f' * 16}), not smollm2-135m" in err
    assert err.rstrip().endswith("; choose another --out")  # the default data directory: OUT/data
