"""Future utility and baseline scores: fast maths vs slow references, and the whole trace pass vs eager attention."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers import DynamicCache

from kvpolicy.errors import KVPError
from kvpolicy.models.attention import record_attention_inputs
from kvpolicy.models.baseline_defaults import SNAPKV_FIT_WINDOW, SNAPKV_KERNEL, SNAPKV_WINDOW, TOVA_WINDOW
from kvpolicy.models.handle import ModelHandle
from kvpolicy.traces.baselines import BASELINES, baseline_scores, baseline_scores_reference, rows_needed
from kvpolicy.traces.future import MID_PROMPT, FutureConfig
from kvpolicy.traces.record import greedy_continuation, record_trace
from kvpolicy.traces.utility import future_utility, grouped_future_attention, grouped_future_attention_reference


@pytest.mark.parametrize("n_q,n_kv,n_prompt,n_future", [(9, 3, 11, 5), (4, 4, 7, 1), (6, 2, 1, 3)])
def test_grouped_future_attention_matches_reference(n_q, n_kv, n_prompt, n_future):
    gen = torch.Generator().manual_seed(n_q * 100 + n_prompt)
    queries = torch.randn(n_q, n_future, 16, generator=gen)
    keys = torch.randn(n_kv, n_prompt + n_future, 16, generator=gen)
    fast = grouped_future_attention(queries, keys, 0.3, n_prompt)
    slow = grouped_future_attention_reference(queries, keys, 0.3, n_prompt)
    assert fast.shape == (n_kv, n_prompt) and fast.dtype == torch.float32
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)


def test_grouped_future_attention_batches_over_layers():
    gen = torch.Generator().manual_seed(2)
    queries, keys = torch.randn(4, 6, 3, 8, generator=gen), torch.randn(4, 2, 9, 8, generator=gen)
    batched = grouped_future_attention(queries, keys, 0.5, 6)
    assert batched.shape == (4, 2, 6)
    for layer in range(4):
        reference = grouped_future_attention_reference(queries[layer], keys[layer], 0.5, 6)
        torch.testing.assert_close(batched[layer], reference)


def test_grouped_future_attention_is_the_sum_of_causal_rows():
    """The utility of F rows is the sum over rows t of the one-row utility over keys up to the row's own position."""
    gen = torch.Generator().manual_seed(0)
    n_prompt, n_future = 7, 4
    queries, keys = torch.randn(6, n_future, 8, generator=gen), torch.randn(2, n_prompt + n_future, 8, generator=gen)
    rows = sum(grouped_future_attention(queries[:, t : t + 1], keys[:, : n_prompt + t + 1], 0.7, n_prompt)
               for t in range(n_future))
    torch.testing.assert_close(grouped_future_attention(queries, keys, 0.7, n_prompt), rows)
    assert (rows.sum(-1) <= n_future * 3 + 1e-5).all()  # per row: the max of 3 distributions sums to <= 3


@pytest.mark.model
@pytest.mark.parametrize("length", [40, 150])
def test_baselines_equal_kvpress_presses(smollm, length):
    ids = torch.randint(100, 5000, (1, length), generator=torch.Generator().manual_seed(length))
    cache = DynamicCache(config=smollm.model.config)
    attn = [layer.self_attn for layer in smollm.layers]
    with torch.inference_mode(), record_attention_inputs(smollm.layers, rows_needed(BASELINES, length)) as recorded:
        smollm.model.model(input_ids=ids, past_key_values=cache, use_cache=True)
        keys, values = [c.keys for c in cache.layers], [c.values for c in cache.layers]
        fast = baseline_scores(BASELINES, attn, recorded, keys)
        slow = baseline_scores_reference(BASELINES, attn, recorded, keys, values)
    for name in BASELINES:
        assert fast[name].shape == (30, 3, length)
        torch.testing.assert_close(fast[name], slow[name], atol=1e-5, rtol=1e-4)


def test_baselines_equal_kvpress_default_presses_on_a_random_model():
    """On a small random Llama (2 query heads per KV head), the batched trace scores equal kvpress's own TOVAPress
    and SnapKVPress at kvpress's default settings, which models/baseline_defaults.py shares with compression."""
    from kvpress import SnapKVPress, TOVAPress
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    length = SNAPKV_WINDOW + 30  # long enough for the full default window
    ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache(config=config)
    layers = model.model.layers
    attn = [layer.self_attn for layer in layers]
    with torch.inference_mode(), record_attention_inputs(layers, rows_needed(BASELINES, length)) as recorded:
        model.model(input_ids=ids, past_key_values=cache, use_cache=True)
        keys, values = [c.keys for c in cache.layers], [c.values for c in cache.layers]
        fast = baseline_scores(BASELINES, attn, recorded, keys)
        for name, press in (("tova", TOVAPress()), ("snapkv", SnapKVPress()),
                            ("snapkv_w16", SnapKVPress(window_size=SNAPKV_FIT_WINDOW))):
            own = torch.stack([
                press.score(a, r.hidden_states, k, v, None, {"position_embeddings": r.position_embeddings})[0]
                for a, r, k, v in zip(attn, recorded, keys, values)
            ]).float()
            assert fast[name].shape == own.shape == (2, 2, length)
            torch.testing.assert_close(fast[name], own, atol=1e-5, rtol=1e-4)


def test_baseline_settings_have_one_home():
    """kvpress's defaults, the trace form's and compression's scorers' settings are the same numbers."""
    from kvpress import SnapKVPress

    from kvpolicy.compression.scorers import make_scorer

    press, snapkv, tova = SnapKVPress(), make_scorer("snapkv"), make_scorer("tova")
    fit = make_scorer("snapkv_w16")
    assert (press.window_size, press.kernel_size) == (SNAPKV_WINDOW, SNAPKV_KERNEL)
    assert (snapkv.window_size, snapkv.kernel_size) == (SNAPKV_WINDOW, SNAPKV_KERNEL)
    assert (fit.window_size, fit.kernel_size) == (SNAPKV_FIT_WINDOW, SNAPKV_KERNEL)
    assert snapkv.query_window == rows_needed(BASELINES, 10 * SNAPKV_WINDOW) and tova.query_window == TOVA_WINDOW
    for name in ("snapkv", "snapkv_w16"):  # each stored SnapKV score reads the rows its scorer records
        assert make_scorer(name).query_window == rows_needed([name], 10 * SNAPKV_WINDOW)


@pytest.mark.model
def test_future_utility_in_layer_chunks_equals_all_at_once(smollm):
    ids = torch.randint(100, 5000, (1, 30), generator=torch.Generator().manual_seed(4))
    cache = DynamicCache(config=smollm.model.config)
    attn = [layer.self_attn for layer in smollm.layers]
    with torch.inference_mode():
        smollm.model.model(input_ids=ids[:, :24], past_key_values=cache, use_cache=True)
        with record_attention_inputs(smollm.layers, rows=6) as recorded:
            smollm.model.model(input_ids=ids[:, 24:], past_key_values=cache, use_cache=True)
        keys = [c.keys for c in cache.layers]
        whole = future_utility(attn, recorded, keys, 24)
        chunked = future_utility(attn, recorded, keys, 24, chunk_bytes=1)  # one layer at a time
    assert whole.shape == (30, 3, 24)
    torch.testing.assert_close(whole, chunked)


def _eager_utility(handle, prompt_ids, future_ids):
    """Slow reference: full eager attention matrices of prompt + future, future rows, group max, summed."""
    eager = copy.deepcopy(handle.model)
    eager.set_attn_implementation("eager")
    full = torch.cat([prompt_ids, torch.tensor([future_ids])], dim=1)
    with torch.inference_mode():
        out = eager(input_ids=full, output_attentions=True, use_cache=True)
    att = torch.stack([a[0] for a in out.attentions])  # (L, Hq, K, K)
    n_layers, n_q, n_keys, _ = att.shape
    n_prompt, n_kv = prompt_ids.shape[1], handle.info.n_kv_heads
    utility = att[:, :, n_prompt:, :n_prompt].reshape(n_layers, n_kv, n_q // n_kv, n_keys - n_prompt, n_prompt)
    keys = torch.stack([layer.keys[0, :, :n_prompt] for layer in out.past_key_values.layers])
    return utility.amax(dim=2).sum(dim=2), keys


@pytest.mark.model
@pytest.mark.parametrize("mode", ["reference", "greedy"])
def test_trace_matches_eager_attention(smollm, mode):
    prompt = smollm.chat([{"role": "user", "content": "Name three rivers of Europe and say where each one ends."}])
    prompt_ids = smollm.encode(prompt)
    reference_ids = smollm.encode(" The Danube ends in the Black Sea, the Rhine in the North Sea.<|im_end|>")
    trace = record_trace(smollm, prompt_ids, FutureConfig(mode, 12), reference_ids, baselines=BASELINES)
    n_prompt = prompt_ids.shape[1]
    if mode == "greedy":  # the model's own continuation, as transformers' greedy generation gives it
        with torch.inference_mode():
            generated = smollm.model.generate(prompt_ids, max_new_tokens=12, do_sample=False,
                                              eos_token_id=sorted(smollm.eos_token_ids))
        assert trace.future_ids == generated[0, n_prompt:].tolist()
    else:
        assert trace.future_ids == reference_ids[0, :12].tolist()
    utility, keys = _eager_utility(smollm, prompt_ids, trace.future_ids)
    assert trace.utility.shape == (30, 3, n_prompt) and trace.keys.shape == (30, 3, n_prompt, 64)
    torch.testing.assert_close(trace.utility, utility, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(trace.keys.float(), keys, atol=2e-2, rtol=2e-3)  # fp16 storage
    assert 0 < trace.model_seconds
    assert set(trace.baselines) == set(BASELINES) and trace.baselines["tova"].shape == (30, 3, n_prompt)


@pytest.mark.model
def test_a_mid_prompt_trace_keeps_the_first_tokens_and_sees_the_rest_of_the_prompt_as_future(smollm):
    prompt = smollm.chat([{"role": "user", "content": "Name three rivers of Europe and say where each one ends."}])
    prompt_ids = smollm.encode(prompt)
    n_prompt = prompt_ids.shape[1]
    kept = n_prompt // 2
    trace = record_trace(smollm, prompt_ids, FutureConfig("greedy", 12, MID_PROMPT), baselines=BASELINES, kept=kept)
    whole = record_trace(smollm, prompt_ids, FutureConfig("greedy", 12))
    assert trace.future_ids == prompt_ids[0, kept:].tolist() + whole.future_ids  # the whole prompt's continuation
    utility, keys = _eager_utility(smollm, prompt_ids[:, :kept], trace.future_ids)
    assert trace.utility.shape == (30, 3, kept) and trace.keys.shape == (30, 3, kept, 64)
    torch.testing.assert_close(trace.utility, utility, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(trace.keys.float(), keys, atol=2e-2, rtol=2e-3)
    alone = record_trace(smollm, prompt_ids[:, :kept], FutureConfig("reference", 4), prompt_ids[:, kept:],
                         baselines=BASELINES)  # the query-based baselines of a prefill of the kept tokens alone
    for name in BASELINES:
        torch.testing.assert_close(trace.baselines[name], alone.baselines[name])
    with pytest.raises(KVPError, match="keeps 1 to"):
        record_trace(smollm, prompt_ids, FutureConfig("greedy", 4), kept=n_prompt + 1)


def test_mid_prompt_cuts_are_drawn_per_sample_and_repeat_on_a_rerun():
    end, mid = FutureConfig("greedy", 8), FutureConfig("greedy", 8, MID_PROMPT)
    assert end.kept_tokens(1000, 0, 3) == 1000 and "cut_at" not in end.describe()
    cuts = [mid.kept_tokens(1000, 0, i) for i in range(200)]
    assert all(250 <= c <= 750 for c in cuts) and len(set(cuts)) > 100
    assert cuts == [mid.kept_tokens(1000, 0, i) for i in range(200)]
    assert cuts != [mid.kept_tokens(1000, 1, i) for i in range(200)]  # another seed, other cuts
    assert 1 <= mid.kept_tokens(3, 0, 0) <= 2 and mid.describe()["cut_at"] == MID_PROMPT
    with pytest.raises(KVPError, match="cuts the prompt at one of"):
        FutureConfig("greedy", 8, "middle")


@pytest.mark.model
def test_greedy_continuation_stops_at_end_of_turn(smollm):
    prompt_ids = smollm.encode(smollm.chat([{"role": "user", "content": "What is 2+2? Answer with one number only."}]))
    cache = DynamicCache(config=smollm.model.config)
    with torch.inference_mode():
        logits = smollm.model(input_ids=prompt_ids, past_key_values=cache, use_cache=True).logits[:, -1]
        tokens = greedy_continuation(smollm, cache, logits, 20)
    assert len(tokens) < 20 and tokens[-1] in smollm.eos_token_ids
    assert all(t not in smollm.eos_token_ids for t in tokens[:-1])


@pytest.mark.model
def test_overlong_prompt_refused_and_future_truncated_with_warning(smollm):
    prompt_ids = smollm.encode(smollm.chat([{"role": "user", "content": "Count: one two three four five."}]))
    n_prompt = prompt_ids.shape[1]
    small = ModelHandle(dataclasses.replace(smollm.info, max_positions=n_prompt + 3), smollm.model, smollm.tokenizer)
    with pytest.raises(KVPError, match="refused: prompt of"):
        record_trace(small, torch.cat([prompt_ids] * 2, dim=1), FutureConfig("greedy", 8))
    with pytest.warns(UserWarning, match="future truncated from 8 to 3 tokens"):
        trace = record_trace(small, prompt_ids, FutureConfig("reference", 8), smollm.encode(" one two three four"))
    assert len(trace.future_ids) == 3 and trace.warnings


def test_future_config_validation():
    with pytest.raises(KVPError, match="unknown future mode"):
        FutureConfig("sampled")
    with pytest.raises(KVPError, match="at least 1 token"):
        FutureConfig("greedy", 0)
