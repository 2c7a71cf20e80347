"""The learned KVP policy as a scorer of the cache engine, of `kvp generate` and of the kvpress press, end to end:
real SmolLM2 traces -> `kvp train` -> `kvp:CKPT`."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import DynamicCache

from kvpolicy.cli import main
from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import BoundedDecoding, compress, greedy_decode, prefill, rank
from kvpolicy.compression.press import KVPolicyPress
from kvpolicy.compression.scorers import make_scorer
from kvpolicy.compression.scorers.learned import KVPScorer, load_policy
from kvpolicy.data.essays import load_essays
from kvpolicy.errors import KVPError
from kvpolicy.policy.checkpoint import OtherWeightsWarning

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def checkpoint(trained_policy):
    return trained_policy


def test_scorer_contract_identity_and_model_check(smollm, checkpoint):
    scorer = make_scorer(f"kvp:{checkpoint}")
    assert isinstance(scorer, KVPScorer) and scorer.attention_free and scorer.query_window == 0
    ident = scorer.identity()
    assert ident["name"] == "kvp" and len(ident["sha256"]) == 64 and ident["fingerprint"] == smollm.info.fingerprint
    # 3 traces without --val: one is held out for validation, 2 train
    assert ident["trained_on"] == {"source": "ruler", "context_tokens": 160, "prompts": 2, "steps": 12}
    assert ident["seed"] == 0  # the training seed: what tells the seeds of one recipe apart
    scorer.check_model(smollm.info)
    KVPScorer(str(checkpoint), model=smollm.info)
    with pytest.warns(OtherWeightsWarning, match="other weights"):
        KVPScorer(str(checkpoint), model=dataclasses.replace(smollm.info, fingerprint="0123456789abcdef"))
    with pytest.raises(KVPError, match="trained for smollm2-135m"):
        KVPScorer(str(checkpoint), model=dataclasses.replace(smollm.info, head_dim=32))
    with pytest.raises(KVPError, match="not a KVP checkpoint"):
        make_scorer("kvp:/nonexistent/ckpt")


def test_load_policy_takes_the_model_in_any_of_its_forms(smollm, checkpoint):
    bundled = load_policy(model=smollm).identity()
    assert bundled["bundled"] and load_policy(model=smollm.info).identity() == bundled
    assert load_policy(model=smollm.model).identity() == bundled  # the plain transformers model, as kvpress has it
    assert load_policy(checkpoint, model=smollm.model).identity()["checkpoint"] == str(checkpoint)
    with pytest.raises(KVPError, match="model= takes a model from kvp.load_model"):
        load_policy(model=42)


def test_engine_compresses_and_decodes_with_the_policy(smollm, checkpoint):
    scorer = make_scorer(f"kvp:{checkpoint}")
    prompt = smollm.encode(load_essays()[3].text)[:, :300]
    state, logits = prefill(smollm, prompt)
    scores = rank(smollm, state, scorer)
    assert len(scores) == smollm.info.n_layers and scores[0].shape == (1, smollm.info.n_kv_heads, 300)
    assert all(torch.isfinite(s).all() for s in scores)
    direct = scorer.policy.score_layer(7, *state.layer(7), state.positions[7])
    torch.testing.assert_close(scores[7], direct)
    small = compress(smollm, state, scorer, Budget(tokens=64))
    assert small.length == 64 and small.nbytes() < state.nbytes() / 4
    ids = greedy_decode(smollm, small, logits, max_new_tokens=4)
    assert len(ids) >= 1
    # decode-time re-ranking: an attention-free scorer keeps the cache within budget + every
    bounded = compress(smollm, prefill(smollm, prompt)[0], scorer, Budget(tokens=64))
    greedy_decode(smollm, bounded, logits, max_new_tokens=10,
                  bounded=BoundedDecoding(scorer, Budget(tokens=64), every=4))
    assert bounded.length <= 64 + 4


def test_kvp_generate_cli(checkpoint, capsys):
    text = load_essays()[2].text[:900]
    assert main(["generate", "--scorer", f"kvp:{checkpoint}", "--budget", "64", "--max-new-tokens", "4", text]) == 0
    assert capsys.readouterr().out.strip()


def test_kvpress_press_keeps_what_the_engine_keeps(smollm, checkpoint):
    scorer = make_scorer(f"kvp:{checkpoint}")
    prompt = smollm.encode(load_essays()[6].text)[:, :200]
    full, _ = prefill(smollm, prompt)
    ours = compress(smollm, full, scorer, Budget(ratio=0.6))
    cache = DynamicCache()
    with torch.no_grad(), KVPolicyPress(compression_ratio=0.6, scorer=scorer)(smollm.model):
        smollm.model.model(input_ids=prompt, past_key_values=cache)
    for idx, layer in enumerate(cache.layers):
        theirs = torch.cdist(layer.keys, full.layer(idx)[0]).argmin(dim=-1).sort(dim=-1).values
        assert torch.equal(ours.positions[idx], theirs), f"layer {idx}"


def test_kvp_press_in_kvpress_pipeline_answers_like_the_engine(smollm, checkpoint):
    """The learned policy through kvpress's own text-generation pipeline gives kvpolicy's answer."""
    from transformers import pipeline

    from kvpolicy.compression.engine import generate

    context, question = load_essays()[7].text[:700], " What is the main point of this text?"
    pipe = pipeline("kv-press-text-generation", model=smollm.model, tokenizer=smollm.tokenizer, device="cpu")
    press = KVPolicyPress(compression_ratio=0.5, scorer=make_scorer(f"kvp:{checkpoint}"))
    answer = pipe(context, question=question, press=press, max_new_tokens=6)["answer"]
    ours = generate(smollm, context, question, make_scorer(f"kvp:{checkpoint}"), Budget(ratio=0.5),
                    "question-agnostic", 6)
    assert answer and answer == ours.text


def test_kvp_press_refuses_another_model(checkpoint):
    """A policy trained on SmolLM2, applied through kvpress to a model of another cache shape, is refused when the
    press is applied, before any forward pass."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=64 * 3, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=3, head_dim=64)
    other = LlamaForCausalLM(config).eval()
    press = KVPolicyPress(compression_ratio=0.5, scorer=make_scorer(f"kvp:{checkpoint}"))
    with pytest.raises(KVPError, match="trained for smollm2-135m"):
        with press(other):
            pass


def test_the_policy_moves_once_to_the_caches_device_and_dtype(smollm, checkpoint):
    """On a bf16 model the policy is cast to bf16 once (not per layer, not per call), and keeps nearly the same
    entries as in fp32."""
    from kvpolicy.models import load_model

    half = load_model("smollm2-135m", dtype="bfloat16")
    prompt = smollm.encode(load_essays()[3].text)[:, :300]
    scorer = make_scorer(f"kvp:{checkpoint}")
    state, _ = prefill(half, prompt)
    rank(half, state, scorer)
    weight = scorer.policy.key_w
    assert weight.dtype == torch.bfloat16
    half_kept = compress(half, state, scorer, Budget(tokens=96)).positions
    assert scorer.policy.key_w.data_ptr() == weight.data_ptr()  # the second ranking moved nothing
    fp32 = make_scorer(f"kvp:{checkpoint}")
    full_kept = compress(smollm, prefill(smollm, prompt)[0], fp32, Budget(tokens=96)).positions
    same = [(a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().mean() for a, b in zip(half_kept, full_kept)]
    overlap = sum(same) / len(same)  # per head: the share of fp32's kept entries that bf16 keeps too
    assert overlap > 0.85, overlap
