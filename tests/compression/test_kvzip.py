"""KVzip through kvpress's own code: its scores are those of kvpress's end-to-end KVzipPress (which pins the kvpress
0.5.5 private steps the scorer drives), it leaves the caller's cache as it was, it ranks only an uncut prefill of one
sequence (the cache's token ids, `KVState.ids`), and the line-up skips it where caches are cut before ranking."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from kvpress import KVzipPress
from transformers import DynamicCache

from kvpolicy.cli import main
from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import BoundedDecoding, continuation_nll, evict, greedy_decode, prefill, rank
from kvpolicy.compression.multi_turn import check_protocol
from kvpolicy.compression.press import KVPolicyPress
from kvpolicy.compression.prompts import split_prompt
from kvpolicy.compression.scorers import make_scorer
from kvpolicy.compression.scorers.kvzip import template_split
from kvpolicy.compression.state import KVState, stack_states
from kvpolicy.errors import KVPError
from kvpolicy.evaluation import perplexity
from kvpolicy.evaluation.bounded_stream import check_stream
from kvpolicy.evaluation.lineup import make_contenders
from kvpolicy.evaluation.names import BOUNDED_STREAM, MULTI_TURN, PROMPT_ONCE, QUERY_AWARE, QUESTION_AGNOSTIC
from kvpolicy.evaluation.result import FULL
from kvpolicy.evaluation.sweep import Sweep, SweepConfig
from kvpolicy.evaluation.tasks import resolve_tasks
from kvpolicy.evaluation.tasks.base import Intervals

CONTEXT = ("The lighthouse keeper of Varn kept a ledger of every ship that passed the cape. In the spring of the "
           "flood year he counted forty-one schooners, nine steamers and a single balloon, which drifted north "
           "over the harbour at dawn and was never seen again. His daughter Ilse later wrote that the balloon "
           "carried a red flag and a dog, though the ledger mentions neither.")


class CapturingKVzip(KVzipPress):
    """kvpress's KVzipPress, keeping its final scores (sinks included) and its chat template split."""

    def compress_post(self, model):
        super().compress_post(model)
        self.captured = SimpleNamespace(scores=self.score_val.clone(), prefix_length=self.prefix_length,
                                        suffix_ids=self._suffix_ids.clone())


def kvpress_kvzip(handle, ids: torch.Tensor, **settings) -> SimpleNamespace:
    """What kvpress's own KVzip computes on a prefill of ids (1, T), run end to end as kvpress runs it; what it leaves
    on the shared model's attention modules (its cut, its rotary embedding) is taken off again."""
    press = CapturingKVzip(compression_ratio=0.5, **settings)  # > 0, or kvpress would not score at all
    modules = [layer.self_attn for layer in handle.layers]
    had_rotary = [hasattr(m, "rotary_emb") for m in modules]
    try:
        with torch.no_grad(), press(handle.model):
            handle.model.model(input_ids=ids, past_key_values=DynamicCache())
        press.captured.masked = [m.masked_key_indices for m in modules]  # its cut: (batch, head, entry) pruned
    finally:
        for module, had in zip(modules, had_rotary):
            module.masked_key_indices = None  # else later forwards of the shared model would mask kvpress's cut
            if not had and hasattr(module, "rotary_emb"):
                del module.rotary_emb
    return press.captured


@pytest.fixture(scope="module")
def prompt(smollm) -> torch.Tensor:
    """A chat-rendered prompt (1, ~100): context, question and the assistant's turn."""
    return torch.cat(split_prompt(smollm, CONTEXT, "What did the balloon carry?"), dim=1)


@pytest.fixture(scope="module")
def full(smollm, prompt) -> KVState:
    return prefill(smollm, prompt)[0]


@pytest.mark.model
@pytest.mark.parametrize("name, settings", [("kvzip", {}), ("kvzip_plus", {"chunk_size": 32})])
def test_scores_are_kvpress_kvzip_end_to_end(smollm, prompt, full, name, settings):
    ours = rank(smollm, full, make_scorer(name, **settings))
    theirs = kvpress_kvzip(smollm, prompt, kvzip_plus_normalization=name == "kvzip_plus", **settings)
    assert len(ours) == smollm.info.n_layers and ours[0].dtype == torch.float32
    for idx, scores in enumerate(ours):
        assert torch.allclose(scores, theirs.scores[idx].float(), rtol=1e-4, atol=1e-6), f"layer {idx}"
    prefix_ids, suffix_ids = template_split(smollm.tokenizer)  # the chat template split as kvpress makes it
    assert prefix_ids.shape[1] == theirs.prefix_length > 0 and torch.equal(suffix_ids, theirs.suffix_ids)
    assert torch.equal(prompt[:, : prefix_ids.shape[1]], prefix_ids)


@pytest.mark.model
@pytest.mark.parametrize("layerwise", [False, True])
def test_the_cut_keeps_what_kvpress_kvzip_keeps(smollm, prompt, layerwise):
    """kvpress's KVzip spreads the budget over all layers and heads (layerwise: over the heads of each layer) and
    masks what it prunes; the engine's cut at the same ratio (kvpress protects sinks but no recent tokens) keeps
    exactly the entries kvpress leaves unmasked, and frees the others."""
    ids = prompt[:, : prompt.shape[1] // 2 * 2]  # an even length: kvpress's rounding of the model's total is ours
    full = prefill(smollm, ids)[0]
    theirs = kvpress_kvzip(smollm, ids, layerwise=layerwise)
    scorer = make_scorer("kvzip", layerwise=layerwise)
    small = evict(full, rank(smollm, full, scorer), Budget(ratio=0.5, recent=0), scorer.allocation)
    T = full.length
    counts = []
    for idx, (positions, masked) in enumerate(zip(small.positions, theirs.masked)):
        pruned = torch.zeros(full.positions[idx].shape, dtype=torch.bool)
        pruned[tuple(masked)] = True
        mask = small.masks[idx] if small.masks is not None else torch.ones_like(positions, dtype=torch.bool)
        kept = torch.zeros_like(pruned)
        for h in range(positions.shape[1]):
            kept[0, h, positions[0, h][mask[0, h]]] = True
        assert torch.equal(kept, ~pruned), f"layer {idx}"
        counts.append(kept.sum(-1))
    counts = torch.cat(counts)
    assert int(counts.sum()) == len(counts.flatten()) * (T // 2) and int(counts.max()) > int(counts.min())


@pytest.mark.model
def test_a_cache_without_the_template_prefix_is_reconstructed_whole(smollm):
    """kvpress leaves the template prefix's length out of the reconstruction whatever the cache starts with; a plain
    text has no such prefix, so every entry after the sinks gets a score of its own."""
    plain, _ = prefill(smollm, smollm.encode(CONTEXT))
    prefix = template_split(smollm.tokenizer)[0].shape[1]
    assert all((scores[..., 4:prefix] > 0).all() for scores in rank(smollm, plain, make_scorer("kvzip")))


@pytest.mark.model
def test_ranking_leaves_the_callers_state_and_the_model_as_they_were(smollm, full, monkeypatch):
    for layer in smollm.layers:  # kvpress's presses attach rotary_emb for good; the scorer only while it scores
        monkeypatch.delattr(layer.self_attn, "rotary_emb", raising=False)
    before = full.clone()
    rank(smollm, full, make_scorer("kvzip"))
    assert (full.length, full.next_position) == (before.length, before.next_position)
    assert torch.equal(full.ids, before.ids) and torch.equal(full.logits, before.logits)
    for idx in range(full.n_layers):
        assert all(torch.equal(a, b) for a, b in zip(full.layer(idx), before.layer(idx)))
        assert torch.equal(full.positions[idx], before.positions[idx])
    assert not any(hasattr(layer.self_attn, "rotary_emb") for layer in smollm.layers)


@pytest.mark.model
def test_only_an_uncut_cache_of_one_sequence_is_ranked(smollm, full):
    kvzip = make_scorer("kvzip")
    cut = evict(full, rank(smollm, full, make_scorer("knorm")), Budget(tokens=48))
    with pytest.raises(KVPError, match="no longer holds every token fed .*rank it before any eviction"):
        rank(smollm, cut, kvzip)
    with pytest.raises(KVPError, match="one sequence, but this cache holds 2; rank each sequence's cache on its own"):
        rank(smollm, stack_states([full, full]), kvzip)


@pytest.mark.model
def test_state_ids_are_the_tokens_of_an_uncut_cache(smollm, prompt):
    state, _ = prefill(smollm, prompt[:, :40])
    assert torch.equal(state.ids, prompt[:, :40])
    prefill(smollm, prompt[:, 40:], state)  # appended in place
    assert torch.equal(state.ids, prompt) and state.ids.dtype == torch.int64
    branch = state.branch()
    prefill(smollm, prompt[:, :3], branch)  # appending to a branch leaves the state as it was
    assert torch.equal(state.ids, prompt) and branch.ids.shape[1] == prompt.shape[1] + 3
    assert torch.equal(state.clone().ids, state.ids)
    assert torch.equal(evict(state, rank(smollm, state, make_scorer("knorm")), Budget(tokens=4096)).ids, state.ids)
    cut = evict(state, rank(smollm, state, make_scorer("knorm")), Budget(tokens=48))
    assert cut.ids is None
    prefill(smollm, prompt[:, :3], cut)
    continuation_nll(smollm, cut, prompt[:, 3:5], append=True)
    assert cut.ids is None  # once cut, never again
    assert torch.equal(stack_states([state, state]).ids, torch.cat([prompt, prompt]))
    answer = greedy_decode(smollm, state, state.logits, 3)
    assert state.ids[0, prompt.shape[1]:].tolist() == answer[: state.ids.shape[1] - prompt.shape[1]]


def test_it_is_refused_wherever_the_cache_is_cut_before_ranking():
    kvzip = make_scorer("kvzip")
    assert kvzip.reads_text and not kvzip.attention_free and kvzip.query_window == 0
    with pytest.raises(KVPError, match="re-reads the cached text, .* cannot re-score the cache while decoding"):
        BoundedDecoding(kvzip, Budget(tokens=64))
    with pytest.raises(KVPError, match="cannot compress a dialogue turn after turn"):
        check_protocol(QUERY_AWARE, kvzip)
    with pytest.raises(KVPError, match="cannot re-rank a cache cut chunk by chunk; use another scorer"):
        check_stream(kvzip, Budget(tokens=64), 16)
    with pytest.raises(KVPError, match="use kvpress's own KVzipPress"):
        KVPolicyPress(compression_ratio=0.5, scorer="kvzip")
    (stream,) = resolve_tasks(["longgen:essays"])
    contender = make_contenders(["kvzip"])[0]
    assert not stream.supports(contender, BOUNDED_STREAM)
    stream.check_lineup([contender], [Budget(tokens=64)], Intervals(stream=(16,)))  # skipped, not refused


def test_gemma3_is_refused_as_kvpress_refuses_it():
    info = SimpleNamespace(name="gemma-3-1b", family="gemma3_text")
    with pytest.raises(KVPError, match="kvpress's KVzip, which does not support Gemma 3 .*use another scorer"):
        make_scorer("kvzip_plus").check_model(info)
    make_scorer("kvzip").check_model(SimpleNamespace(name="qwen2.5-0.5b", family="qwen2"))


@pytest.mark.model
def test_the_dialogue_skips_it_under_multi_turn_and_runs_it_prompt_once(smollm, tmp_path):
    config = SweepConfig(out=str(tmp_path / "r.jsonl"), scorers=["kvzip", "knorm"], budgets=["32"],
                         tasks=["dialogue"], protocols=[MULTI_TURN, PROMPT_ONCE], context_tokens=[192], n_samples=1)
    planned = Sweep(config)
    units = planned.plan(smollm)
    assert {u.protocol: [c.spec for c in u.contenders] for u in units} == {
        MULTI_TURN: [FULL, "knorm"], PROMPT_ONCE: [FULL, "kvzip", "knorm"]}
    assert f"dialogue: skipped KVzip under {MULTI_TURN} (cannot run there)" in planned.notes
    (task,) = resolve_tasks(["dialogue"])
    sample = units[0].samples[0]
    (out,) = perplexity.run_dialogue(smollm, sample, PROMPT_ONCE, make_contenders(["kvzip"]), [Budget(tokens=32)],
                                     lambda _, label: label != FULL, task.max_answer_tokens)
    assert out.kept == 32 and math.isfinite(out.fields["nll_sum"])


@pytest.mark.model
def test_kvp_generate_and_a_tiny_sweep_run_it(smollm, tmp_path, capsys):
    assert main(["generate", "--scorer", "kvzip", "--budget", "32", "--max-new-tokens", "2", "--json",
                 "--question", "What did the balloon carry?", CONTEXT]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["scorer"]["name"] == "kvzip" and record["cache_tokens_compressed"] == 32
    out = tmp_path / "r.jsonl"
    assert main(["sweep", "--out", str(out), "--task", "ruler:niah_single_1", "--context", "160", "--n", "1",
                 "--scorer", "kvzip_plus", "--budget", "32", "--max-new-tokens", "2",
                 "--protocol", QUERY_AWARE, QUESTION_AGNOSTIC]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["scorer"], r["protocol"]) for r in records) == [
        (FULL, QUERY_AWARE), (FULL, QUESTION_AGNOSTIC),
        ("kvzip_plus", QUERY_AWARE), ("kvzip_plus", QUESTION_AGNOSTIC)]
