"""Adaptive allocation without a model: AdaKV's counts against a slow reference and kvpress's own AdaKVPress,
PyramidKV's against kvpress's formula, and the padded, masked cut the engine builds from them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from kvpress import AdaKVPress, DMSPress, PyramidKVPress, ScorerPress

from kvpolicy.compression.allocation import (
    UNIFORM,
    AdaKV,
    Global,
    Layerwise,
    Pyramid,
    Threshold,
    counts_reference,
    kept_entries,
)
from kvpolicy.compression.budget import Budget, keep_indices, protected_scores
from kvpolicy.compression.engine import evict
from kvpolicy.compression.head_masks import attention_bias, grouped_sdpa
from kvpolicy.compression.ragged import RaggedLayer
from kvpolicy.compression.state import KVState, cache_from_tensors, stack_states
from kvpolicy.errors import KVPError


def random_keys(layers: int, B: int, H: int, T: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, generator=generator) * (1 + torch.arange(H).view(1, H, 1)) for _ in range(layers)]


def random_state(layers: int = 3, B: int = 2, H: int = 3, T: int = 40, d: int = 4, seed: int = 0) -> KVState:
    generator = torch.Generator().manual_seed(seed)
    tensors = [(torch.randn(B, H, T, d, generator=generator), torch.randn(B, H, T, d, generator=generator))
               for _ in range(layers)]
    positions = [torch.arange(T).expand(B, H, T).clone() for _ in range(layers)]
    return KVState(cache_from_tensors(tensors), positions, next_position=T, logits=torch.zeros(B, 5))


@pytest.mark.parametrize("shape,kept", [((2, 2, 3, 30), 8), ((1, 3, 5, 17), 1), ((2, 1, 4, 12), 12)])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_adakv_counts_equal_the_slow_reference(shape, kept, alpha):
    layers, B, H, T = shape
    keys = random_keys(layers, B, H, T)
    allocation = AdaKV(alpha_safeguard=alpha)
    fast, slow = allocation.counts(keys, kept), counts_reference(allocation, keys, kept)
    safe = max(1, int(kept * alpha)) if alpha else 0
    for f, s in zip(fast, slow):
        assert torch.equal(f, s)
        assert torch.equal(f.sum(-1), torch.full((B,), H * kept))  # the uniform cut's memory, exactly
        assert int(f.min()) >= safe
    if safe < kept < T:
        assert any(int(f.max()) > int(f.min()) for f in fast)  # heads really differ (so the test can fail)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.875])
def test_adakv_counts_equal_kvpress_adakvpress(ratio):
    """kvpress's AdaKVPress masks the entries it prunes; the counts it leaves per head are ours."""
    B, H, T = 2, 4, 64
    scores = random_keys(1, B, H, T, seed=3)[0]

    class Given(ScorerPress):
        def score(self, *args, **kwargs):
            return scores.clone()

    module = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"), masked_key_indices=None)
    AdaKVPress(press=Given(compression_ratio=ratio)).compress(module, None, None, None, None, {})
    batch, head, _ = module.masked_key_indices
    pruned = torch.zeros(B, H, dtype=torch.long).index_put_((batch, head), torch.ones_like(head), accumulate=True)
    ours = AdaKV().counts([scores], Budget(ratio=ratio).kept(T))[0]
    assert torch.equal(ours, T - pruned)


def test_pyramid_follows_kvpress_and_keeps_the_uniform_memory():
    L, T, kept = 30, 2048, 1536
    budgets = Pyramid(window_size=64).layer_budgets(L, T, kept)
    press = PyramidKVPress(compression_ratio=0.25, window_size=64)
    config = SimpleNamespace(num_hidden_layers=L)
    assert budgets == [press.get_layer_budget(SimpleNamespace(config=config, layer_idx=i), T) for i in range(L)]
    assert budgets[0] > budgets[-1] and abs(sum(budgets) - L * kept) <= L  # a pyramid, at the uniform memory
    assert Pyramid(window_size=64).layer_budgets(L, T, 256) == [256] * L  # kvpress falls back to SnapKV here
    with pytest.raises(KVPError, match="beta"):
        Pyramid(beta=0)


def test_uniform_allocation_cuts_as_before():
    state = random_state()
    scores = random_keys(state.n_layers, 2, 3, 40, seed=1)
    budget = Budget(tokens=24)
    small = evict(state, scores, budget, UNIFORM)
    assert small.masks is None and small.length == 24
    for idx, s in enumerate(scores):
        keep = keep_indices(s, state.positions[idx], budget, state.next_position)
        assert torch.equal(small.positions[idx], keep)


@pytest.mark.parametrize("kept", [1, 5, 40, 63])
def test_kept_entries_of_every_layer_at_once_equal_each_layer_alone_ties_included(kept):
    torch.manual_seed(kept)
    keys = [torch.randint(0, 4, (2, 3, 64)).float() for _ in range(5)]  # many exact ties
    counts = [torch.full((2, 3), kept) for _ in keys]
    together = kept_entries(keys, counts)
    for key, (keep, attended) in zip(keys, together):
        assert attended is None  # every kept entry attended
        alone, alone_attended = kept_entries([key, key[:, :, :-1]], counts[:2])[0]  # layer by layer: two shapes
        assert torch.equal(keep, alone) and bool(alone_attended.all())
        assert torch.equal(keep, kept_entries([key], [counts[0]])[0][0]) and torch.equal(keep, keep.sort(-1).values)
        assert torch.equal(key.gather(-1, keep).sort(-1).values, key.sort(-1).values[..., -kept:])


def test_adakv_cut_masks_each_layers_padding_and_holds_none_of_it():
    state = random_state()
    scores = random_keys(state.n_layers, 2, 3, 40, seed=2)
    budget = Budget(tokens=24)
    small = evict(state, scores, budget, AdaKV())
    assert small.masks is not None
    counts = AdaKV().counts([protected_scores(s, p, budget, 40).masked_fill((p < 4) | (p >= 24), torch.inf)
                             for s, p in zip(scores, state.positions)], 24)
    for idx, (mask, count) in enumerate(zip(small.masks, counts)):
        assert torch.equal(mask.sum(-1), count)  # each head attends exactly its count
        assert small.lengths()[idx] == int(count.max())  # padded to the layer's largest count, no more
        key = protected_scores(scores[idx], state.positions[idx], budget, 40)
        for b in range(2):
            for h in range(3):
                attended = small.positions[idx][b, h][mask[b, h]]
                best = key[b, h].topk(int(count[b, h])).indices.sort().values
                assert torch.equal(attended, best)
                assert set(range(4)) | set(range(24, 40)) <= set(attended.tolist())  # sinks and recent kept
    assert small.attended() == pytest.approx(24)
    assert small.nbytes() == state.nbytes() * 24 / 40  # stored ragged: exactly the uniform cut's bytes
    assert small.nbytes() < sum(k.nbytes + v.nbytes for k, v in map(small.layer, range(3)))  # the padded view


def test_a_masked_entry_stays_masked_through_a_second_cut():
    state = random_state()
    scores = random_keys(state.n_layers, 2, 3, 40, seed=4)
    once = evict(state, scores, Budget(tokens=30), AdaKV())
    again = evict(once, [torch.randn(p.shape) for p in once.positions], Budget(tokens=24), UNIFORM)
    for first, second, p1, p2 in zip(once.masks, again.masks or [None] * 3, once.positions, again.positions):
        dropped = {(b, h, int(x)) for b in range(2) for h in range(3) for x in p1[b, h][~first[b, h]]}
        if second is None:
            continue
        kept = {(b, h, int(x)) for b in range(2) for h in range(3) for x in p2[b, h][second[b, h]]}
        assert not dropped & kept


def test_stack_states_keeps_masks():
    state = random_state(B=1)
    adaptive = evict(state, random_keys(3, 1, 3, 40, seed=5), Budget(tokens=30), AdaKV())
    assert adaptive.masks is not None
    unmasked = KVState(adaptive.cache, adaptive.positions, adaptive.next_position, logits=adaptive.logits)
    both = stack_states([adaptive, unmasked])
    for mine, stacked in zip(adaptive.masks, both.masks):
        assert torch.equal(stacked[0], mine[0]) and bool(stacked[1].all())
    assert stack_states([unmasked, unmasked]).masks is None
    other = evict(state, random_keys(3, 1, 3, 40, seed=6), Budget(tokens=30), AdaKV())
    if other.lengths() != adaptive.lengths():
        with pytest.raises(KVPError, match="equal cache lengths"):
            stack_states([adaptive, other])


def test_padded_stacking_extends_each_layer_to_its_longest_row_and_masks_the_rest():
    state = random_state(B=1)
    adaptive = evict(state, random_keys(3, 1, 3, 40, seed=5), Budget(tokens=30), AdaKV())
    small = evict(state, random_keys(3, 1, 3, 40, seed=6), Budget(tokens=22))  # uniform, no masks
    both = stack_states([small, adaptive], pad=True)
    assert both.lengths() == adaptive.lengths() and both.ids is None
    for i in range(3):
        keys, values = both.layer(i)
        width = small.lengths()[i]
        assert torch.equal(keys[0, :, :width], small.layer(i)[0][0]) and not keys[0, :, width:].any()
        assert torch.equal(values[1], adaptive.layer(i)[1][0]) and not values[0, :, width:].any()
        assert bool(both.masks[i][0, :, :width].all()) and not both.masks[i][0, :, width:].any()
        assert torch.equal(both.masks[i][1], adaptive.masks[i][0])
        assert bool((both.positions[i][0].diff(dim=-1) >= 0).all())  # the padding repeats the last position
    with pytest.raises(KVPError, match="equal cache lengths"):
        stack_states([small, adaptive])
    assert stack_states([small, small], pad=True).masks is None  # nothing to pad, nothing masked


def test_attention_bias_equals_attention_over_the_kept_entries():
    """sdpa with the bias = per head, softmax over that head's attended cached entries and the causal new ones."""
    generator = torch.Generator().manual_seed(7)
    B, H, groups, past, new, d = 2, 2, 3, 9, 4, 8
    mask = torch.rand(B, H, past, generator=generator) > 0.4
    q = torch.randn(B, H * groups, new, d, generator=generator)
    k = torch.randn(B, H, past + new, d, generator=generator)
    v = torch.randn(B, H, past + new, d, generator=generator)
    bias = attention_bias(mask, new, groups, torch.float32)
    got = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=bias)
    for b in range(B):
        for qh in range(H * groups):
            h = qh // groups
            for i in range(new):
                visible = [j for j in range(past) if mask[b, h, j]] + list(range(past, past + i + 1))
                weights = torch.softmax(q[b, qh, i] @ k[b, h, visible].T / d ** 0.5, dim=-1)
                assert torch.allclose(got[b, qh, i], weights @ v[b, h, visible], atol=1e-5)


def test_grouped_sdpa_gives_transformers_attention_the_same_output_without_repeating_heads():
    """transformers' sdpa attention with a per-head mask: the grouped call equals the repeated one bit for bit, and
    the switch is undone after the block, even when it raises."""
    from transformers.integrations import sdpa_attention

    generator = torch.Generator().manual_seed(3)
    B, H, groups, past, d = 3, 2, 3, 17, 8
    module = SimpleNamespace(num_key_value_groups=groups, is_causal=True)
    q = torch.randn(B, H * groups, 1, d, generator=generator)
    k, v = (torch.randn(B, H, past + 1, d, generator=generator) for _ in range(2))
    bias = attention_bias(torch.rand(B, H, past, generator=generator) > 0.3, 1, groups, torch.float32)
    repeated, _ = sdpa_attention.sdpa_attention_forward(module, q, k, v, bias)
    original = sdpa_attention.use_gqa_in_sdpa
    with grouped_sdpa(torch.device("cpu")):
        assert sdpa_attention.use_gqa_in_sdpa(bias, k)
        grouped, _ = sdpa_attention.sdpa_attention_forward(module, q, k, v, bias)
    assert torch.equal(grouped, repeated) and sdpa_attention.use_gqa_in_sdpa is original
    with pytest.raises(RuntimeError), grouped_sdpa(torch.device("cpu")):
        raise RuntimeError
    assert sdpa_attention.use_gqa_in_sdpa is original


def test_threshold_follows_the_calibration_quantiles():
    uniform = Threshold(quantiles=tuple(torch.linspace(0, 1, 101).tolist()), window=8)
    assert uniform.threshold(8 + 23, 8 + 100) == pytest.approx(1 - 0.23)  # keep 23% of the 100 outside the window
    assert uniform.threshold(200, 108) == -torch.inf
    keys = [torch.rand(2, 3, 108, generator=torch.Generator().manual_seed(8))]
    keys[0][..., -8:] = torch.inf  # the window
    assert torch.equal(uniform.counts(keys, 31)[0], (keys[0] >= uniform.threshold(31, 108)).sum(-1))
    assert uniform.threshold(31, 108, fixed=12) == pytest.approx(1 - 19 / 96)
    with pytest.raises(KVPError, match="budget of at least 8"):
        uniform.threshold(4, 108)
    with pytest.raises(KVPError, match="calibration"):
        Threshold().threshold(64, 108)


def test_thresholded_cut_keeps_what_kvpress_dmspress_keeps():
    """DMSPress masks, once they leave its sliding window, the entries scoring below its threshold; the engine's cut
    with the Threshold allocation (the window above every threshold, as the thresholded scorer gives it, no sinks
    or recent tokens of its own) keeps exactly the others."""
    B, H, T, window, tau = 1, 3, 60, 8, 0.3
    scores = torch.rand(B, H, T, generator=torch.Generator().manual_seed(9))

    class Given(ScorerPress):
        def score(self, *args, **kwargs):
            return scores.clone()

    keys = torch.zeros(B, H, T, 4)
    cache = cache_from_tensors([(keys, keys)])
    module = SimpleNamespace(layer_idx=0, masked_key_indices=None)
    kwargs = {"hidden_states": torch.zeros(B, T, 4), "past_key_values": cache, "cache_position": torch.arange(T)}
    DMSPress(press=Given(), threshold=tau, sliding_window_size=window).forward_hook(module, [], kwargs, None)
    dropped = torch.zeros(B, H, T, dtype=torch.bool)
    dropped[tuple(module.masked_key_indices)] = True

    state = random_state(layers=1, B=B, H=H, T=T)
    windowed = scores.masked_fill(state.positions[0] >= T - window, torch.inf)
    small = evict(state, [windowed], Budget(tokens=32, sinks=0, recent=0), Threshold(quantiles=(tau, tau),
                                                                                          window=window))
    kept = torch.zeros(B, H, T, dtype=torch.bool)
    for h in range(H):
        kept[0, h, small.positions[0][0, h][small.masks[0][0, h]]] = True
    assert torch.equal(kept, ~dropped)
    assert len({int(n) for n in kept.sum(-1).flatten()}) > 1  # heads keep what their scores give them


@pytest.mark.parametrize("kept", [1, 7, 20])
def test_global_counts_equal_the_slow_reference(kept):
    keys = random_keys(3, 2, 2, 20, seed=11)
    fast, slow = Global().counts(keys, kept), counts_reference(Global(), keys, kept)
    for f, s in zip(fast, slow):
        assert torch.equal(f, s)
    assert torch.equal(sum(f.sum(-1) for f in fast), torch.full((2,), 3 * 2 * kept))  # the uniform cut's memory
    if kept < 20:
        assert len({int(n) for f in fast for n in f.flatten()}) > 1  # layers and heads really differ


@pytest.mark.parametrize("kept", [1, 7, 13, 20])
def test_layerwise_counts_equal_the_slow_reference_and_keep_the_uniform_total(kept):
    keys = [k * (1 + 2 * layer) for layer, k in enumerate(random_keys(4, 2, 3, 20, seed=12))]  # layers differ
    fast, slow = Layerwise().counts(keys, kept), counts_reference(Layerwise(), keys, kept)
    for f, s in zip(fast, slow):
        assert torch.equal(f, s)
        assert torch.equal(f, f[:, :1].expand_as(f))  # the heads of a layer share one count
    assert torch.equal(sum(f.sum(-1) for f in fast), torch.full((2,), 4 * 3 * kept))  # the uniform cut's memory
    if 1 < kept < 20:
        assert len({int(f[0, 0]) for f in fast}) > 1  # layers really differ (so the test can fail)


def test_a_layerwise_cut_keeps_dense_layers_of_their_own_lengths_and_protects_every_head():
    state = random_state(layers=4, B=1)  # (rows of a batch may give a layer other counts: then it is ragged)
    scores = [k * (1 + 2 * layer) for layer, k in enumerate(random_keys(4, 1, 3, 40, seed=13))]
    small = evict(state, scores, Budget(tokens=24), Layerwise())
    assert len(set(small.lengths())) > 1 and all(bool(m.all()) for m in small.masks)  # layers differ, no padding
    assert not any(isinstance(layer, RaggedLayer) for layer in small.cache.layers)
    assert sum(small.lengths()) == 4 * 24 and small.nbytes() == state.nbytes() * 24 / 40
    for positions in small.positions:
        assert torch.isin(torch.tensor([0, 1, 2, 3, *range(24, 40)]), positions).all()  # sinks and recent, everywhere


def test_global_counts_equal_kvpress_kvzip_pruning():
    """kvpress's KVzipPress.compress_post (layerwise=False) prunes the model's lowest scores; the counts it leaves
    per layer and head are ours (a ratio where its rounding and ours agree)."""
    from kvpress import KVzipPress

    L, B, H, T, ratio = 3, 1, 2, 32, 0.75
    scores = torch.stack(random_keys(L, B, H, T, seed=12))
    scores[..., :4] = scores.amax() + 1  # kvpress's sinks, as our protected keys are
    layers = [SimpleNamespace(self_attn=SimpleNamespace(layer_idx=i, masked_key_indices=None,
                                                        config=SimpleNamespace(_attn_implementation="sdpa")))
              for i in range(L)]
    press = KVzipPress(compression_ratio=ratio, n_sink=4)
    press.score_val = scores.clone()
    press.compress_post(SimpleNamespace(model=SimpleNamespace(layers=layers)))
    ours = Global().counts(list(scores), Budget(ratio=ratio).kept(T))
    for layer, count in zip(layers, ours):
        batch, head, _ = layer.self_attn.masked_key_indices
        pruned = torch.zeros(B, H, dtype=torch.long).index_put_((batch, head), torch.ones_like(head), accumulate=True)
        assert torch.equal(count, T - pruned)


@pytest.mark.model
def test_a_sweep_records_what_adaptive_cuts_attend_and_hold(smollm, tmp_path):
    """AdaKV and PyramidKV rows in a real (tiny) sweep: `kept` is the budget attended per head on average, and the
    bytes are what the cache holds: AdaKV's ragged layers and PyramidKV's per-layer lengths both the uniform cut's."""
    import json

    from kvpolicy.cli import main

    out = tmp_path / "r.jsonl"
    assert main(["sweep", "--out", str(out), "--task", "ruler:niah_single_1", "--context", "200", "--n", "1",
                 "--scorer", "adakv_snapkv_w16", "pyramidkv_w16", "snapkv_w16", "--budget", "48",
                 "--max-new-tokens", "2", "--no-full-cache"]) == 0
    records = {r["scorer"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert {r["kept"] for r in records.values()} == {48}
    uniform = records["snapkv_w16"]["cache_bytes"]
    assert records["adakv_snapkv_w16"]["cache_bytes"] == uniform == records["pyramidkv_w16"]["cache_bytes"]
