"""`kvp train-kvzap`'s run without a model: the collection is replaced by synthetic prompts (seeded as the real ones
are), so the tests see what is collected, where, and what each seed fixes. --seed fixes the data, --fit-seed the
MLP's fit alone; runs share a --data directory without collecting again, and one collected otherwise is refused in
one line, as is a directory of the earlier layout (OUT/run.json) made with other settings."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvpolicy.cli import build_parser, main
from kvpolicy.compression.scorers import make_scorer
from kvpolicy.io import sha256_file
from kvpolicy.kvzap import pipeline
from kvpolicy.kvzap.cli import run_config
from kvpolicy.kvzap.collect import prompt_file, token_generator
from kvpolicy.kvzap.config import KVzapRunConfig, MLPConfig
from kvpolicy.models.handle import ModelInfo
from kvpolicy.policy.kvzap import kvzap_weights

INFO = ModelInfo(name="tiny", family="llama", n_layers=2, n_kv_heads=2, n_query_heads=4, head_dim=4,
                 max_positions=512, fingerprint="0123456789abcdef")
HIDDEN, TOKENS, LENGTH = 8, 40, 200  # sampled tokens at positions 0, 5, ..., 195 of a 200-token prompt
TINY = ["--model", "tiny", "--n", "3", "--val-n", "1", "--context", "64", "--mlp-hidden", "4", "--mlp-epochs", "2",
        "--mlp-batch", "16"]


@pytest.fixture
def collected(monkeypatch) -> list[tuple[Path, int]]:
    """Stand in for the model and the collection: each missing prompt gets synthetic inputs and targets drawn by
    its token generator (so they depend on --seed, split and index, as collected data does); the list records each
    split directory collected into and how many prompts it got."""
    calls: list[tuple[Path, int]] = []

    def collect_split(handle, cfg, split, n, directory):
        todo = [i for i in range(n) if not prompt_file(directory, i).exists()]
        directory.mkdir(parents=True, exist_ok=True)
        for index in todo:
            g = token_generator(cfg.seed, split, index)
            inputs = torch.randn(TOKENS, INFO.n_layers, HIDDEN, generator=g)
            targets = inputs[..., : INFO.n_kv_heads] * 2 + 0.1 * torch.randn(TOKENS, INFO.n_layers, INFO.n_kv_heads,
                                                                              generator=g)
            save_file({"inputs": inputs.half(), "targets": targets, "positions": torch.arange(0, 5 * TOKENS, 5)},
                      str(prompt_file(directory, index)), metadata={"tokens": str(LENGTH)})
        calls.append((directory, len(todo)))
        return len(todo)

    monkeypatch.setattr(pipeline, "collect_split", collect_split)
    monkeypatch.setattr("kvpolicy.models.load_model", lambda *args, **kwargs: SimpleNamespace(info=INFO))
    return calls


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _parse(*argv: str):
    return build_parser().parse_args(["train-kvzap", *TINY, *argv, "--out", "o"])


def test_seed_fixes_the_data_and_fit_seed_the_mlp_alone():
    default = run_config(_parse("--seed", "3"))
    assert default.seed == 3 and default.mlp.seed == 3  # --fit-seed defaults to --seed
    split = run_config(_parse("--seed", "3", "--fit-seed", "7"))
    assert split.seed == 3 and split.mlp.seed == 7
    assert split.collection() == default.collection()  # the fit seed is no part of the data
    assert _parse().data is None and _parse("--data", "shared").data == "shared"


def test_the_recorded_command_reproduces_the_run():
    cfg = KVzapRunConfig(n=5, seed=2, kinds=("mlp",), mlp=MLPConfig(hidden=4, seed=9))
    command = cfg.command("tiny", "runs/k-s9", "runs/k-data")
    assert "--seed 2 --fit-seed 9" in command and command.endswith("--data runs/k-data --out runs/k-s9")
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert run_config(args) == cfg and (args.data, args.out, args.model) == ("runs/k-data", "runs/k-s9", "tiny")


def test_fit_seeds_share_one_data_directory_collected_once(collected, tmp_path):
    first, data = tmp_path / "kvzap-s0", tmp_path / "kvzap-s0" / "data"
    assert main(["train-kvzap", *TINY, "--out", str(first)]) == 0  # default: OUT/data
    assert collected == [(data / "train", 3), (data / "val", 1)]
    assert (data / "run.json").exists() and not (first / "run.json").exists()
    record = json.loads((data / "run.json").read_text())
    assert record["model"]["fingerprint"] == INFO.fingerprint and record["collection"]["seed"] == 0
    assert "--seed 0 --fit-seed 0" in _metrics(first)["command"]
    files = {p: p.stat().st_mtime_ns for p in data.rglob("*.safetensors")}
    assert len(files) == 4

    collected.clear()
    second = tmp_path / "kvzap-s1"
    assert main(["train-kvzap", *TINY, "--kind", "mlp", "--fit-seed", "1", "--data", str(data),
                 "--out", str(second)]) == 0
    assert collected == [(data / "train", 0), (data / "val", 0)]  # nothing collected again
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*.safetensors")} == files
    assert not (second / "data").exists() and not (second / "linear").exists()
    metrics = _metrics(second)
    assert set(metrics["kinds"]) == {"mlp"} and metrics["kinds"]["mlp"]["seed"] == 1
    # the weights say which fit they are, and a scorer's identity tells the seeds apart
    assert kvzap_weights("mlp", second) == {INFO.name: {"sha256": sha256_file(second / "mlp" / "model.safetensors"),
                                                        "seed": 1}}
    assert kvzap_weights("mlp", first)[INFO.name]["seed"] == 0 and kvzap_weights("linear", first)[INFO.name]["seed"] \
        is None  # the ridge fit has no seed
    assert make_scorer(f"kvzap_mlp:{second}").identity() != make_scorer(f"kvzap_mlp:{first}").identity()
    assert metrics["data"] == _metrics(first)["data"]  # the same prompts and tokens
    assert "--seed 0 --fit-seed 1" in metrics["command"] and f"--data {data} --out {second}" in metrics["command"]
    first_layer = "layers.0.0.weight"
    assert not torch.equal(_weights(second / "mlp")[first_layer], _weights(first / "mlp")[first_layer])

    again = tmp_path / "kvzap-again"  # the fit seed alone decides the MLP on shared data
    assert main(["train-kvzap", *TINY, "--kind", "mlp", "--fit-seed", "0", "--data", str(data),
                 "--out", str(again)]) == 0
    assert all(torch.equal(w, _weights(first / "mlp")[k]) for k, w in _weights(again / "mlp").items())


@pytest.mark.parametrize("change, theirs, mine", [
    (["--seed", "1"], "--seed 0", "--seed 1"),
    (["--context", "128"], "--context 64", "--context 128"),
])
def test_shared_data_collected_otherwise_is_refused(collected, tmp_path, capsys, change, theirs, mine):
    data = tmp_path / "kvzap-data"
    assert main(["train-kvzap", *TINY, "--data", str(data), "--out", str(tmp_path / "a")]) == 0
    collected.clear()
    capsys.readouterr()
    assert main(["train-kvzap", *TINY, *change, "--fit-seed", "0", "--data", str(data),
                 "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert (f"{data} holds KVzap data collected with {theirs}, not {mine}; re-run with {theirs} or choose another "
            "--data") in err
    assert collected == [] and not (tmp_path / "b" / "metrics.json").exists()


def test_an_out_of_the_earlier_layout_keeps_its_record(collected, tmp_path, capsys):
    out = tmp_path / "kvzap"
    assert main(["train-kvzap", *TINY, "--out", str(out)]) == 0
    (out / "data" / "run.json").replace(out / "run.json")  # as runs before --data left it

    assert main(["train-kvzap", *TINY, "--seed", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "collected with --seed 0, not --seed 1; re-run with --seed 0 or choose another --out" in err
    assert (out / "run.json").exists() and not (out / "data" / "run.json").exists()

    collected.clear()
    assert main(["train-kvzap", *TINY, "--out", str(out)]) == 0
    assert collected == [(out / "data" / "train", 0), (out / "data" / "val", 0)]
    assert (out / "data" / "run.json").exists() and not (out / "run.json").exists()  # moved beside the data


def test_data_of_another_model_is_refused(collected, tmp_path, capsys):
    data = tmp_path / "shared"
    assert main(["train-kvzap", *TINY, "--data", str(data), "--out", str(tmp_path / "a")]) == 0
    run = json.loads((data / "run.json").read_text())
    run["model"] |= {"name": "other-model", "fingerprint": "f" * 16}
    (data / "run.json").write_text(json.dumps(run))
    capsys.readouterr()
    assert main(["train-kvzap", *TINY, "--data", str(data), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{data} holds KVzap data of other-model (fingerprint {'f' * 16}), not tiny" in err
    assert err.rstrip().endswith("choose another --data")


def test_the_weights_carry_their_threshold_calibration(collected, tmp_path):
    """The thresholded form's quantiles: the scores of the training tokens outside the 128-token window (positions
    below 200 - 128: 15 of the 40 sampled per prompt), every layer and head pooled."""
    from kvpolicy.compression.allocation import DMS_WINDOW as WINDOW
    from kvpolicy.kvzap.calibrate import LEVELS
    from kvpolicy.kvzap.collect import load_split
    from kvpolicy.policy.kvzap import kvzap_thresholds, load_kvzap

    out = tmp_path / "k"
    assert main(["train-kvzap", *TINY, "--out", str(out)]) == 0
    X, _ = load_split(out / "data" / "train", 3)
    rows = torch.arange(0, 5 * TOKENS, 5).repeat(3) < LENGTH - WINDOW
    assert int(rows.sum()) == 3 * 15
    for kind in ("linear", "mlp"):
        window, quantiles = kvzap_thresholds(out / kind)
        model = load_kvzap(out / kind)
        with torch.no_grad():
            expected = model(X[rows].float()).flatten().double().quantile(torch.linspace(0, 1, LEVELS).double())
        assert window == WINDOW and len(quantiles) == LEVELS
        assert torch.allclose(torch.tensor(quantiles, dtype=torch.float64), expected, atol=1e-5)
        everything = model(X.float()).flatten().double().quantile(torch.tensor([0.5], dtype=torch.float64))
        assert abs(quantiles[LEVELS // 2] - float(everything)) > 1e-6  # the window's tokens are left out
