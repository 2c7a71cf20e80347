"""`--allocation head|layer|model`: any scorer whose scores compare across heads, at the uniform cut's memory, in
the Python API, `kvp generate`, `kvp sweep` and bounded decoding; refused where it cannot mean anything."""

from __future__ import annotations

import json

import pytest
import torch

from kvpolicy.cli import main
from kvpolicy.compression.allocation import UNIFORM, Global, Layerwise
from kvpolicy.compression.budget import Budget
from kvpolicy.compression.catalog import label
from kvpolicy.compression.engine import BoundedDecoding, compress, decode_answers, greedy_decode, prefill
from kvpolicy.compression.names import split_mode, with_mode
from kvpolicy.compression.ragged import RaggedLayer
from kvpolicy.compression.scorers import make_scorer
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.bounded_stream import stream_steps


def test_a_mode_is_a_spec_suffix_with_a_label_and_an_identity():
    assert split_mode("knorm@model") == ("knorm", "model") and split_mode("kvp:/a@b/ckpt") == ("kvp:/a@b/ckpt", "head")
    assert with_mode("knorm", "head") == "knorm" and with_mode("knorm", "layer") == "knorm@layer"
    assert label("knorm@model") == "KNorm (model-wide budget)" and label("knorm") == "KNorm"
    plain, moved = make_scorer("knorm"), make_scorer("knorm@layer")
    assert plain.allocation is UNIFORM and isinstance(moved.allocation, Layerwise)
    assert moved.identity() == plain.identity() | {"allocation": "layer"}
    assert isinstance(make_scorer("keydiff@model").allocation, Global)


def test_the_python_api_wraps_any_scorer_in_a_mode():
    import kvpolicy as kvp

    knorm = make_scorer("knorm")
    assert kvp.with_allocation(knorm, "head") is knorm
    assert kvp.with_allocation(knorm, "model").identity() == make_scorer("knorm@model").identity()
    with pytest.raises(KVPError, match="choose one of layer, model"):
        kvp.with_allocation(knorm, "heads")


def test_modes_are_refused_where_they_cannot_mean_anything():
    with pytest.raises(KVPError, match="already spreads its budget"):
        make_scorer("adakv_snapkv@model")
    with pytest.raises(KVPError, match="already spreads its budget"):
        make_scorer("pyramidkv@layer")


@pytest.mark.model
@pytest.mark.parametrize("mode", ["layer", "model"])
def test_a_moved_budget_holds_the_uniform_memory_and_decodes(smollm, mode):
    prompt = torch.tensor([list(range(300, 500))])
    full, _ = prefill(smollm, prompt)
    budget = Budget(tokens=48)
    uniform, moved = (compress(smollm, full, make_scorer(spec), budget) for spec in ("knorm", f"knorm@{mode}"))
    assert moved.nbytes() == uniform.nbytes() and moved.attended() == pytest.approx(48)
    if mode == "layer":
        assert len(set(moved.lengths())) > 1 and not any(isinstance(x, RaggedLayer) for x in moved.cache.layers)
    else:
        assert any(isinstance(x, RaggedLayer) for x in moved.cache.layers)
    for positions, mask in zip(moved.positions, moved.masks):  # the sinks and recent tokens in every head
        for head in range(positions.shape[1]):
            kept = set(positions[0, head][mask[0, head]].tolist())
            assert set(range(4)) | set(range(184, 200)) <= kept
    assert len(greedy_decode(smollm, moved, moved.logits, 4, stop_ids=())) == 4


@pytest.mark.model
def test_bounded_decoding_and_streams_keep_the_average_within_budget_plus_every(smollm):
    prompt = torch.tensor([list(range(300, 420))])
    full, _ = prefill(smollm, prompt)
    budget, every = Budget(tokens=40), 6
    state = compress(smollm, full, make_scorer("knorm@model"), budget)
    sizes = []
    bounded = BoundedDecoding(make_scorer("knorm@model"), budget, every)
    decode_answers(smollm, state, state.logits, 14, stop_ids=(), bounded=bounded,
                   on_token=lambda _row, _token: sizes.append(state.attended()))
    assert max(sizes) <= budget.tokens + every and min(sizes) < budget.tokens + every - 1  # it was cut again
    ids, fed, after = torch.tensor([list(range(300, 460))]), [], []
    for step in stream_steps(smollm, ids, make_scorer("knorm@layer"), budget, 32):
        fed.append(step.fed)
        after.append(step.state.attended())
    assert fed == [33, 65, 72, 72, 71] and after == [33, 40, 40, 40, 71]  # cut after every chunk but the first and last


@pytest.mark.model
def test_kvp_generate_and_sweep_take_allocation_modes(tmp_path, capsys):
    args = ["generate", "The code is 4721. Remember it. " * 8, "--question", "What is the code?", "--scorer", "knorm",
            "--budget", "24", "--max-new-tokens", "2", "--json"]
    outs = {}
    for mode in ("head", "model"):
        assert main([*args, "--allocation", mode]) == 0
        outs[mode] = json.loads(capsys.readouterr().out)
    assert outs["model"]["allocation"] == "model" and outs["model"]["scorer"]["allocation"] == "model"
    assert outs["model"]["cache_bytes_compressed"] == outs["head"]["cache_bytes_compressed"]
    bundled = [a if a != "knorm" else "kvp@model" for a in args]  # the bundled policy ships calibrated
    assert main(bundled) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["allocation"] == "model" and out["scorer"]["bundled"] and "calibration_sha256" in out["scorer"]
    assert main([*args[:-1], "--scorer", "knorm@model", "--allocation", "layer"]) == 1
    assert "give one" in capsys.readouterr().err
    out = tmp_path / "r.jsonl"
    assert main(["sweep", "--out", str(out), "--task", "ruler:niah_single_1", "--context", "200", "--n", "1",
                 "--scorer", "knorm", "--allocation", "head", "layer", "model", "--budget", "48",
                 "--max-new-tokens", "2", "--no-full-cache"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["scorer_label"] for r in records) == ["KNorm", "KNorm (model-wide budget)",
                                                         "KNorm (per-layer budget)"]
    assert len({r["cache_bytes"] for r in records}) == 1 and {r["kept"] for r in records} == {48}
