"""The compression engine on SmolLM2: physical eviction is exact, positions continue, decoding stays bounded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from kvpolicy.compression.allocation import AdaKV, Pyramid
from kvpolicy.compression.budget import Budget
from kvpolicy.compression.multi_turn import converse
from kvpolicy.compression.engine import (
    BoundedDecoding,
    compress,
    continuation_nll,
    evict,
    generate,
    greedy_decode,
    greedy_decode_batch,
    prefill,
    rank,
)
from kvpolicy.compression.scorers import ALL_QUERIES, KnormScorer, make_scorer
from kvpolicy.compression.state import stack_states
from kvpolicy.data.essays import load_essays
from kvpolicy.errors import KVPError
from kvpolicy.models import ModelHandle, ModelInfo

pytestmark = pytest.mark.model


def essay_ids(handle, tokens: int, essay: int = 0) -> torch.Tensor:
    return handle.encode(load_essays()[essay].text)[:, :tokens]


# (device, dtype) the exactness tests run in, and how close physical eviction must come to the masked reference
# (max and mean absolute logit difference): float32 to summation order; bfloat16 within its rounding noise through
# 30 layers (measured: max 0.25-0.69, mean 0.04-0.38 at |logit| ~ 20, where one bf16 step is 0.125), while
# leaving the evicted entries visible moves the logits by more than 3x the max tolerance (measured 3.4-4.5).
PLACEMENTS = [
    pytest.param(("cpu", "float32"), id="cpu-fp32"),
    pytest.param(("cpu", "bfloat16"), id="cpu-bf16"),
    pytest.param(("cuda", "bfloat16"), id="cuda-bf16", marks=pytest.mark.gpu),
]
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1.0, 0.5)}


@pytest.fixture(scope="module", params=PLACEMENTS)
def placed(request):
    """SmolLM2 on each device and dtype of PLACEMENTS (CUDA ones skip where there is no CUDA)."""
    device, dtype = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from kvpolicy.models import load_model

    return load_model("smollm2-135m", device=device, dtype=dtype)


@pytest.fixture(scope="module")
def placed_prompt(placed):
    return essay_ids(placed, 200)


@pytest.fixture(scope="module")
def placed_full(placed, placed_prompt):
    state, _ = prefill(placed, placed_prompt)
    return state


@pytest.fixture(scope="module")
def prompt(smollm):
    return essay_ids(smollm, 200)


@pytest.fixture(scope="module")
def full(smollm, prompt):
    """The uncompressed state after the prompt, with every query recorded."""
    state, _ = prefill(smollm, prompt, record_queries=ALL_QUERIES)
    return state


def masked_reference_logits(handle, prompt, kept, chunks):
    """Next-token logits after each chunk, fed after the FULL prompt cache with every evicted entry masked out of
    attention: per layer and KV head, an explicit 4D additive mask (1, query heads, q, kv) is swapped into that
    layer's attention. This is the meaning physical eviction must reproduce. kept: per layer (H, k) positions, or
    (H, P) bool (True = kept), for heads that keep different numbers of entries."""
    model, group, P = handle.model, handle.info.group_size, prompt.shape[1]
    device, dtype = model.device, model.dtype
    prompt = prompt.to(device)
    masks: dict[int, torch.Tensor] = {}

    def hook_for(idx):
        def hook(module, args, kwargs):
            kwargs["attention_mask"] = masks[idx]
            return args, kwargs
        return hook

    hooks = [layer.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(handle.layers)]
    cache, fed, outputs = DynamicCache(), P, []
    try:
        with torch.no_grad():
            masks.update({i: None for i in range(len(kept))})
            model(input_ids=prompt, past_key_values=cache, use_cache=True)
            for chunk in chunks:
                n = chunk.shape[1]
                for idx, positions in enumerate(kept):
                    visible = torch.zeros(positions.shape[0], n, fed + n, dtype=torch.bool, device=device)
                    kept_old = torch.zeros(positions.shape[0], P, dtype=torch.bool, device=device)
                    if positions.dtype != torch.bool:
                        kept_old = kept_old.scatter(1, positions, True)
                    visible[:, :, :P] = (positions if positions.dtype == torch.bool else kept_old)[:, None]
                    visible[:, :, P:fed] = True  # tokens fed after the compression
                    visible[:, :, fed:] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
                    mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, float("-inf"))
                    masks[idx] = mask.repeat_interleave(group, dim=0).unsqueeze(0)  # KV head -> its query heads
                out = model(input_ids=chunk.to(device), past_key_values=cache, use_cache=True, logits_to_keep=1,
                            position_ids=torch.arange(fed, fed + n, device=device)[None])
                outputs.append(out.logits[:, -1])
                fed += n
    finally:
        for h in hooks:
            h.remove()
    return outputs


CHUNKS = [[504, 3794, 314, 563, 260, 1645, 282], [1835], [335], [1205, 2555, 284]]  # multi-token and single tokens


def feed_chunks_against_reference(handle, prompt, small, kept) -> list[torch.Tensor]:
    """Feed CHUNKS after the cut state `small` and check each chunk's logits against `masked_reference_logits`
    (kept: as it takes them) within TOLERANCE; returns the reference logits."""
    got = [prefill(handle, torch.tensor([chunk]), small)[1] for chunk in CHUNKS]
    reference = masked_reference_logits(handle, prompt, kept, [torch.tensor([c]) for c in CHUNKS])
    largest, mean = TOLERANCE[handle.model.dtype]
    for mine, ref in zip(got, reference):
        diff = (mine.float() - ref.float()).abs()
        assert diff.max() <= largest and diff.mean() <= mean, (diff.max(), diff.mean())
    return reference


def test_budget_at_least_length_is_identical(placed, placed_full):
    same = compress(placed, placed_full, make_scorer("knorm"), Budget(tokens=10_000))
    assert same.length == placed_full.length and same.nbytes() == placed_full.nbytes()
    a, b = same, placed_full.clone()
    for chunk in CHUNKS:
        assert torch.equal(prefill(placed, torch.tensor([chunk]), a)[1], prefill(placed, torch.tensor([chunk]), b)[1])


@pytest.mark.parametrize("scorer", ["knorm", "random"])
def test_physical_eviction_equals_masked_full_cache(placed, placed_prompt, placed_full, scorer):
    full, prompt, dtype = placed_full, placed_prompt, placed.model.dtype
    small = compress(placed, full, make_scorer(scorer), Budget(tokens=64))
    kept = [p[0] for p in small.positions]
    assert small.length == 64 and small.nbytes() * prompt.shape[1] == full.nbytes() * 64
    assert small.layer(0)[0].dtype == dtype and small.layer(0)[0].device == placed.model.device
    assert all(p.device == placed.model.device for p in small.positions)
    if scorer == "knorm":  # heads and layers really keep different entries
        assert not torch.equal(kept[0][0], kept[0][1]) and not torch.equal(kept[0], kept[1])
    reference = feed_chunks_against_reference(placed, prompt, small, kept)
    largest = TOLERANCE[dtype][0]
    unmasked = prefill(placed, torch.tensor([CHUNKS[0]]), full.clone())[1]
    assert (unmasked.float() - reference[0].float()).abs().max() > 3 * largest  # the eviction matters: can fail
    assert small.next_position == prompt.shape[1] + sum(map(len, CHUNKS))
    assert small.length == 64 + sum(map(len, CHUNKS))


@pytest.mark.parametrize("allocation", [AdaKV(), Pyramid(window_size=16, beta=2)], ids=["adakv", "pyramid"])
def test_adaptive_eviction_equals_masked_full_cache(placed, placed_prompt, placed_full, allocation):
    """Heads of a layer keeping different counts (AdaKV: padded, masked) or layers keeping different lengths
    (PyramidKV): prefill chunks and decoding attend exactly the kept entries."""
    full, prompt = placed_full, placed_prompt
    small = evict(full, rank(placed, full, make_scorer("knorm")), Budget(tokens=64), allocation)
    assert small.masks is not None and small.attended() == pytest.approx(64, abs=0.5)
    counts = [m.sum(-1) for m in small.masks]
    if isinstance(allocation, AdaKV):
        assert any(int(c.max()) > int(c.min()) for c in counts)  # heads keep different counts
    else:
        assert len(set(small.lengths())) > 1 and all(bool(m.all()) for m in small.masks)  # layers differ, no padding
    visible = [torch.zeros(p.shape[1], prompt.shape[1], dtype=torch.bool, device=p.device).scatter(1, p[0], m[0])
               for p, m in zip(small.positions, small.masks)]
    feed_chunks_against_reference(placed, prompt, small, visible)
    fed = sum(map(len, CHUNKS))
    assert [m.shape[-1] for m in small.masks] == small.lengths()  # the masks grew with the cache
    assert all(bool(m[..., -fed:].all()) for m in small.masks)  # and every token fed after the cut is attended


def test_cuts_of_any_shapes_decode_as_one_padded_batch(smollm, full):
    """Uniform cuts at two budgets, an AdaKV cut (padded heads) and a PyramidKV cut (layers of other lengths),
    stacked with padding: each row decodes (fp32) the tokens it decodes alone."""
    scores = rank(smollm, full, make_scorer("knorm"))
    cuts = [evict(full, scores, Budget(tokens=24)), evict(full, scores, Budget(tokens=64)),
            evict(full, scores, Budget(tokens=48), AdaKV()),
            evict(full, scores, Budget(tokens=48), Pyramid(window_size=16, beta=2))]
    assert len({tuple(c.lengths()) for c in cuts}) == 4
    alone = [greedy_decode(smollm, cut.branch(), cut.logits, 8, stop_ids=()) for cut in cuts]
    batch = stack_states(cuts, pad=True)
    assert greedy_decode_batch(smollm, batch, batch.logits, 8, stop_ids=()) == alone


def test_positions_continue_from_the_true_length(smollm, prompt, full):
    small = compress(smollm, full, make_scorer("knorm"), Budget(tokens=48))
    P = prompt.shape[1]
    assert small.next_position == P and small.length == 48
    for layer, positions in enumerate(small.positions):  # kept entries carry their original positions
        keys = small.layer(layer)[0]
        assert torch.equal(keys, full.layer(layer)[0].gather(2, positions.unsqueeze(-1).expand_as(keys)))
    chunk = torch.tensor([CHUNKS[0]])
    control = small.clone()
    advanced, right = prefill(smollm, chunk, small)
    assert advanced.next_position == P + 7 and advanced.length == 48 + 7
    assert all(torch.equal(p[..., -7:], torch.arange(P, P + 7).expand(1, 3, 7)) for p in advanced.positions)
    # control: RoPE positions taken from the shrunken cache length give other logits (so the tests can fail)
    with torch.no_grad():
        out = smollm.model(input_ids=chunk, past_key_values=control.cache, use_cache=True, logits_to_keep=1)
    assert (out.logits[:, -1] - right).abs().max() > 1e-2


def test_rank_once_cut_many_budgets(smollm, full):
    scores = rank(smollm, full, make_scorer("keydiff"))
    before = [k.clone() for k, _ in map(full.layer, range(full.n_layers))]
    kept = {b: evict(full, scores, Budget(tokens=b)).positions for b in (24, 48, 96)}
    for small, large in ((24, 48), (48, 96)):
        for p_small, p_large in zip(kept[small], kept[large]):
            assert torch.isin(p_small, p_large).all()  # nested per head
    assert all(torch.equal(b, full.layer(i)[0]) for i, b in enumerate(before))  # input untouched


def test_clone_is_independent(smollm, full):
    copy = full.clone()
    prefill(smollm, torch.tensor([[504, 3794]]), copy)
    assert copy.length == full.length + 2 and copy.next_position == full.next_position + 2
    assert full.layer(0)[0].shape[2] == full.length == len(full.positions[0][0, 0])
    assert copy.layer(0)[0].data_ptr() != full.layer(0)[0].data_ptr()


def test_cuts_of_one_size_decode_as_one_batch(placed, placed_full):
    """Cuts by several scorers at one budget, stacked, decode together: each row gets the tokens of its own greedy
    decoding (in bf16, up to a tie within its rounding noise), a stop token ends only its own row, and the cuts
    themselves are left untouched."""
    smollm, full = placed, placed_full
    budget = Budget(tokens=48)
    cuts = [compress(smollm, full, make_scorer(name), budget) for name in ("knorm", "keydiff", "streaming_llm")]
    alone = [greedy_decode(smollm, cut.branch(), cut.logits, 8, stop_ids=()) for cut in cuts]
    assert len({tuple(a) for a in alone}) > 1  # the scorers' cuts really differ
    batch = stack_states(cuts)
    assert batch.layer(0)[0].shape == (3, smollm.info.n_kv_heads, 48, smollm.info.head_dim)
    together = greedy_decode_batch(smollm, batch, batch.logits, 8, stop_ids=())
    if smollm.dtype_name == "float32":
        assert together == alone
    else:  # a batch of 3 rounds differently from a batch of 1: rows may part only where two tokens tie in bf16
        for cut, one, row in zip(cuts, alone, together):
            t = next((i for i, (a, b) in enumerate(zip(one, row)) if a != b), None)
            if t is not None:
                assert t > 0  # the first token comes from the cut's own logits, the same in both
                _, logits = prefill(smollm, torch.tensor([one[:t]]), cut.branch())
                assert abs(float(logits[0, one[t]] - logits[0, row[t]])) <= TOLERANCE[torch.bfloat16][0]
    assert batch.length == 48 + 8 and all(cut.length == 48 for cut in cuts)

    rows = batch.rows([2, 0])  # rows of a batch: as if stacked in that order
    assert rows.length == batch.length and rows.next_position == batch.next_position
    for layer in range(batch.n_layers):
        assert torch.equal(rows.layer(layer)[0], batch.layer(layer)[0][[2, 0]])
        assert torch.equal(rows.positions[layer], batch.positions[layer][[2, 0]])
    assert torch.equal(rows.logits, batch.logits[[2, 0]]) and rows.recorded is None

    stop = together[1][2]
    batch = stack_states(cuts)
    stopped = greedy_decode_batch(smollm, batch, batch.logits, 8, stop_ids=(stop,))
    assert stopped == [a[: a.index(stop) + 1] if stop in a else a for a in together]
    with pytest.raises(KVPError, match="equal cache lengths"):
        stack_states([cuts[0], full])
    with pytest.raises(KVPError, match="one row per cached sequence"):
        greedy_decode_batch(smollm, stack_states(cuts), cuts[0].logits, 4)


def test_bounded_decoding_never_exceeds_budget_plus_every(smollm, full):
    budget, every = Budget(tokens=40), 6
    state = compress(smollm, full, make_scorer("knorm"), budget)
    seen = []
    hook = smollm.layers[0].self_attn.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs["past_key_values"].layers[0].keys.shape[2]),
        with_kwargs=True,
    )
    try:
        bounded = BoundedDecoding(make_scorer("knorm"), budget, every)
        tokens = greedy_decode(smollm, state, state.logits, 20, stop_ids=(), bounded=bounded)
    finally:
        hook.remove()
    assert len(tokens) == 20 and len(seen) == 20
    assert max(seen) == budget.tokens + every and min(seen) == budget.tokens + 1
    assert state.length <= budget.tokens + every and state.next_position == full.next_position + 20


def test_bounded_decoding_refusals():
    with pytest.raises(KVPError, match="attention-free"):
        BoundedDecoding(make_scorer("snapkv"), Budget(tokens=64))
    with pytest.raises(KVPError, match="absolute token budget"):
        BoundedDecoding(make_scorer("knorm"), Budget(ratio=0.5))
    with pytest.raises(KVPError):
        BoundedDecoding(make_scorer("knorm"), Budget(tokens=64), every=0)


def test_continuation_nll_matches_a_single_forward(smollm, prompt, full):
    continuation = essay_ids(smollm, 12, essay=3)
    nll = continuation_nll(smollm, full, continuation)
    assert full.next_position == prompt.shape[1]  # untouched
    with torch.no_grad():
        logits = smollm.model(torch.cat([prompt, continuation], dim=1)).logits[0, prompt.shape[1] - 1 : -1]
    assert torch.allclose(nll, F.cross_entropy(logits, continuation[0], reduction="none"), atol=1e-4)
    small = compress(smollm, full, make_scorer("knorm"), Budget(tokens=32))
    assert not torch.allclose(continuation_nll(smollm, small, continuation), nll, atol=1e-3)


def test_generate_labels_protocol_and_shrinks_cache(smollm):
    context = load_essays()[4].text[:600]
    full = generate(smollm, context, " Summarize.", None, None, max_new_tokens=3)
    same = generate(smollm, context, " Summarize.", make_scorer("knorm"), Budget(tokens=5000), max_new_tokens=3)
    assert full.text == same.text and full.cache_bytes_full == same.cache_bytes_compressed
    for protocol in ("query-aware", "question-agnostic"):
        result = generate(smollm, context, " Summarize.", make_scorer("snapkv"), Budget(tokens=80), protocol, 2)
        assert result.protocol == protocol and result.to_dict()["protocol"] == protocol
        assert result.cache_tokens_compressed == 80
        assert result.cache_bytes_compressed * result.cache_tokens_full == result.cache_bytes_full * 80
        expected_full = result.context_tokens + (result.question_tokens if protocol == "query-aware" else 0)
        assert result.cache_tokens_full == expected_full and result.token_ids
    with pytest.raises(KVPError, match="protocol"):
        generate(smollm, context, "?", make_scorer("knorm"), Budget(tokens=32), "sideways")


def test_dialogue_compresses_every_turn_and_continues(smollm):
    turns = ["Tell me one fact about the moon.", "And one about the sun?", "Which is bigger?"]
    budget = Budget(tokens=48)
    results, state = converse(smollm, turns, make_scorer("knorm"), budget, max_new_tokens=5)
    for r in results:
        assert r.cache_tokens_after == min(48, r.cache_tokens_before) and r.token_ids
    assert state.next_position > results[0].cache_tokens_before + 16 and state.length < state.next_position
    agnostic, _ = converse(smollm, turns[:2], make_scorer("keydiff"), Budget(tokens=24), "question-agnostic", 4)
    assert agnostic[0].cache_tokens_before == 0 and agnostic[1].cache_tokens_before > 24
    assert agnostic[1].cache_tokens_after == 24 and agnostic[1].next_position > agnostic[0].next_position
    with pytest.raises(KVPError, match="query-aware"):
        converse(smollm, turns, make_scorer("tova"), budget, "question-agnostic")


def test_teacher_forced_dialogue_without_eviction_matches_one_pass(smollm):
    turns, answers = ["Name a colour.", "Another one?"], ["Blue is a colour.", "Green."]
    results, state = converse(smollm, turns, make_scorer("knorm"), Budget(tokens=100_000), reference_answers=answers)
    messages, text, ids, answer_slices = [], "", [], []
    for user, answer in zip(turns, answers):
        messages.append({"role": "user", "content": user})
        prompt = smollm.chat(messages)
        ids += smollm.encode(prompt[len(text):])[0].tolist()
        answer_ids = smollm.encode(answer)[0].tolist()
        answer_slices.append(slice(len(ids), len(ids) + len(answer_ids)))
        ids += answer_ids
        messages.append({"role": "assistant", "content": answer})
        text = prompt + answer
    assert state.next_position == state.length == len(ids)
    with torch.no_grad():
        logits = smollm.model(torch.tensor([ids])).logits[0]
    for r, where in zip(results, answer_slices):
        expected = F.cross_entropy(logits[where.start - 1 : where.stop - 1], torch.tensor(ids[where]), reduction="none")
        assert torch.allclose(torch.tensor(r.nll), expected, atol=1e-4)


def test_query_scorers_need_recorded_queries(smollm, prompt, full):
    bare, _ = prefill(smollm, prompt[:, :40])
    with pytest.raises(KVPError, match="record_queries"):
        rank(smollm, bare, make_scorer("tova"))
    small = compress(smollm, full, make_scorer("tova"), Budget(tokens=64))  # evicting drops the recording
    with pytest.raises(KVPError, match="record_queries"):
        rank(smollm, small, make_scorer("h2o"))
    short, _ = prefill(smollm, prompt[:, :30], record_queries=30)
    with pytest.raises(KVPError, match="last 65 tokens"):
        rank(smollm, short, make_scorer("snapkv"))


def test_bad_inputs_are_refused(smollm, prompt, full):
    with pytest.raises(KVPError, match="padded"):
        prefill(smollm, torch.ones(2, 5, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1] * 5]))
    with pytest.raises(KVPError, match="batch size"):
        prefill(smollm, torch.ones(2, 3, dtype=torch.long), full.clone())
    with pytest.raises(KVPError, match="positions"):
        prefill(smollm, torch.ones(1, smollm.info.max_positions, dtype=torch.long), full.clone())
    with pytest.raises(KVPError, match="layers"):
        evict(full, rank(smollm, full, make_scorer("knorm"))[:3], Budget(tokens=32))
    with pytest.raises(KVPError, match="empty"):
        prefill(smollm, torch.zeros(1, 0, dtype=torch.long))


def test_a_model_sliding_in_every_layer_is_refused():
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                         max_window_layers=0)
    info = ModelInfo("tiny-sliding", "qwen2", 4, 2, 4, 8, 64, "none")
    handle = ModelHandle(info=info, model=Qwen2ForCausalLM(config).eval(), tokenizer=None)
    with pytest.raises(KVPError, match=r"sliding-window attention in every layer"):
        prefill(handle, torch.ones(1, 4, dtype=torch.long))


def test_all_query_scorers_refuse_a_partial_recording(smollm, prompt):
    partial, _ = prefill(smollm, prompt[:, :80], record_queries=65)
    with pytest.raises(KVPError, match="every token"):
        rank(smollm, partial, make_scorer("expected_attention"))
    rank(smollm, partial, make_scorer("snapkv"))  # 65 rows are what SnapKV needs


def test_rank_asks_the_scorer_whether_it_fits_the_model(smollm, full):
    class OtherModelPolicy(KnormScorer):  # e.g. a learned policy trained on another model
        def check_model(self, info):
            raise KVPError(f"policy trained for another model, not {info.name}")

    with pytest.raises(KVPError, match="not smollm2-135m"):
        rank(smollm, full, OtherModelPolicy())
