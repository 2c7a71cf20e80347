"""KVP agents that also read the layers' input hidden states, end to end on the real SmolLM2: traces recorded with
the states (each layer's attention input, from which the model computes the stored keys), training, calibration and
trace costs on them, and a scorer that ranks the cache of one whole prefill (refused where the states of cached
entries are gone: decoding, chunked prefills, traces without states)."""

from __future__ import annotations

import json

import pytest
import torch

from kvpolicy.cli import main
from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import BoundedDecoding, generate
from kvpolicy.compression.scorers import ALL_QUERIES, make_scorer
from kvpolicy.errors import KVPError
from kvpolicy.models.attention import apply_rope
from kvpolicy.traces.store import TraceReader

pytestmark = pytest.mark.usefixtures("one_thread")
TRACE = ["traces", "--source", "ruler", "--context", "160", "--future-tokens", "8", "--baselines", "none"]


@pytest.fixture(scope="module")
def runs(smollm, tmp_path_factory):
    """Traces with and without states, and a policy trained briefly on those with them."""
    root = tmp_path_factory.mktemp("states")
    with_states, plain, policy = root / "states", root / "plain", root / "ckpt"
    assert main([*TRACE, "--n", "3", "--hidden-states", "--out", str(with_states)]) == 0
    assert main([*TRACE, "--n", "2", "--out", str(plain)]) == 0
    assert main(["train", "--traces", str(with_states), "--out", str(policy), "--hidden-states", "--steps", "4",
                 "--batch", "2", "--tokens", "16", "--hidden", "8", "--val-every", "2", "--warmup", "1",
                 "--no-compile"]) == 0
    return with_states, plain, policy


@pytest.mark.model
def test_traces_hold_the_attention_inputs_the_keys_come_from(smollm, runs):
    reader = TraceReader(runs[0])
    assert reader.has_states and not TraceReader(runs[1]).has_states
    trace = reader.read_layers(1)
    n_layers, heads, length, dim = trace.keys.shape
    assert trace.states.shape == (n_layers, length, 576) and trace.states.dtype == torch.float16
    layer = 5
    module = smollm.layers[layer].self_attn
    states = trace.states[layer][None].float()
    with torch.no_grad():
        keys = module.k_proj(states).view(1, length, heads, dim).transpose(1, 2)
        cos, sin = smollm.model.model.rotary_emb(keys, torch.arange(length)[None])
        keys = apply_rope(keys, cos, sin)
    torch.testing.assert_close(keys[0], trace.keys[layer].float(), atol=2e-2, rtol=1e-2)
    assert reader.read(1, layer).states.shape == (length, 576)
    assert torch.equal(reader.read_layers(1, [layer]).states[0], trace.states[layer])


@pytest.mark.model
def test_a_directory_mixes_no_traces_with_and_without_states(runs, capsys):
    assert main([*TRACE, "--n", "3", "--out", str(runs[0])]) == 1
    assert "hidden_states: True there vs False now" in capsys.readouterr().err


@pytest.mark.model
def test_training_reads_the_states_and_refuses_traces_without_them(runs, capsys):
    config = json.loads((runs[2] / "config.json").read_text())
    assert config["policy"]["hidden_state_dim"] == 576 and config["policy"]["hidden_state_features"] == 16
    assert main(["train", "--traces", str(runs[1]), "--out", str(runs[1].parent / "no"), "--hidden-states"]) == 1
    assert "record them with `kvp traces ... --hidden-states`" in capsys.readouterr().err


@pytest.mark.model
def test_the_scorer_ranks_a_whole_prefill_only(smollm, runs):
    scorer = make_scorer(f"kvp:{runs[2]}")
    assert scorer.reads_states and scorer.whole_prefill and scorer.query_window == ALL_QUERIES
    assert not make_scorer("kvp:smollm2-135m").reads_states  # the bundled policy reads the cache alone
    context = "The harbor master logged forty ships that week, and the tally was posted at noon. " * 8
    for protocol in ("query-aware", "question-agnostic"):
        result = generate(smollm, context, " How many ships?", scorer, Budget(tokens=48), protocol, 3)
        assert result.cache_tokens_compressed == 48 and result.token_ids
    with pytest.raises(KVPError, match="attention-free"):
        BoundedDecoding(scorer, Budget(tokens=48))
    with pytest.raises(KVPError, match="reads every cached entry's own hidden state"):
        generate(smollm, context, "?", scorer, Budget(tokens=48), prefill_chunk=64)


@pytest.mark.model
def test_calibration_and_trace_costs_read_the_states(runs, tmp_path, capsys):
    with_states, plain, policy = runs
    assert main(["calibrate", "--policy", str(policy), "--traces", str(with_states)]) == 0
    assert "calibration" in json.loads((policy / "config.json").read_text())
    out = tmp_path / "r.jsonl"
    assert main(["sweep", "--task", f"traces:{with_states}", f"traces:{plain}", "--n", "2", "--budget", "64",
                 "--scorer", f"kvp:{policy}", "knorm", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    learned = {r["task"] for r in records if r["scorer"] == f"kvp:{policy}"}
    assert learned == {"traces:states"}  # traces without states: skipped, with a note
    assert "traces:plain: skipped KVP under traces" in capsys.readouterr().err
