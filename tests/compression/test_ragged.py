"""Ragged layers: a layer whose heads keep different counts holds no padding, and attends exactly as padded."""

from __future__ import annotations

import pytest
import torch

from kvpolicy.compression.allocation import AdaKV, Global
from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import evict, greedy_decode, prefill, rank
from kvpolicy.compression.ragged import RaggedLayer, layer_bytes
from kvpolicy.compression.scorers import ALL_QUERIES, make_scorer
from kvpolicy.compression.state import KVState, cache_from_tensors, stack_states
from kvpolicy.errors import KVPError


def padded_layer(seed: int = 0, B: int = 2, H: int = 3, W: int = 10, d: int = 4):
    generator = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(B, H, W, d, generator=generator), torch.randn(B, H, W, d, generator=generator)
    mask = torch.rand(B, H, W, generator=generator) < 0.6
    mask[..., 0] = True
    return keys, values, mask


def test_a_ragged_layer_holds_the_masked_entries_only_and_reads_them_back_padded():
    keys, values, mask = padded_layer()
    layer = RaggedLayer.from_padded(keys, values, mask)
    assert layer.flat_keys.shape == (int(mask.sum()), 4)
    assert layer.nbytes == layer_bytes(layer) == 2 * int(mask.sum()) * 4 * 4  # keys and values, fp32, no padding
    assert torch.equal(layer.keys[mask], keys[mask]) and torch.equal(layer.values[mask], values[mask])
    assert not layer.keys[~mask].any() and layer.get_seq_length() == 10
    new_k, new_v = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    shared = layer.shared()
    read_k, read_v = layer.update(new_k, new_v)
    assert read_k.shape == (2, 3, 12, 4) and torch.equal(read_k[:, :, 10:], new_k)
    assert torch.equal(read_v[:, :, :10][mask], values[mask])
    assert layer.get_seq_length() == 12 and layer.nbytes == 2 * (int(mask.sum()) + 12) * 4 * 4
    assert shared.get_seq_length() == 10  # the shared copy did not grow with the other


def test_a_ragged_layer_refuses_flat_entries_that_do_not_match_its_mask():
    keys, values, mask = padded_layer()
    with pytest.raises(KVPError, match="one row per masked entry"):
        RaggedLayer(mask, keys[mask][1:], values[mask][1:], keys[:, :, :0], values[:, :, :0])


def test_only_layers_with_padding_are_stored_ragged():
    keys, values, mask = padded_layer()
    cache = cache_from_tensors([(keys, values), (keys, values)], [mask, torch.ones_like(mask)])
    assert isinstance(cache.layers[0], RaggedLayer) and not isinstance(cache.layers[1], RaggedLayer)
    assert layer_bytes(cache.layers[1]) == keys.nbytes + values.nbytes


@pytest.mark.model
@pytest.mark.parametrize("allocation", [AdaKV(), Global()], ids=["adakv", "global"])
def test_ragged_cut_attends_bit_for_bit_as_the_padded_cut_and_holds_the_uniform_bytes(smollm, allocation):
    """An adaptive cut stored ragged against the same cut stored padded (dense layers, the same masks): decoding,
    a multi-token chunk (a dialogue turn) and a second cut give identical logits (fp32); the ragged cut holds the
    uniform cut's bytes (model-wide: the same total), the padded one more."""
    prompt = torch.tensor([list(range(300, 460))])
    full, _ = prefill(smollm, prompt, record_queries=ALL_QUERIES)
    scores = rank(smollm, full, make_scorer("knorm"))
    ragged = evict(full, scores, Budget(tokens=48), allocation)
    padded = KVState(cache_from_tensors([ragged.layer(i) for i in range(ragged.n_layers)]), list(ragged.positions),
                     ragged.next_position, None, ragged.logits, masks=list(ragged.masks))
    assert any(isinstance(layer, RaggedLayer) for layer in ragged.cache.layers)
    assert not any(isinstance(layer, RaggedLayer) for layer in padded.cache.layers)
    assert ragged.nbytes() == evict(full, scores, Budget(tokens=48)).nbytes() < padded.nbytes()
    turn = torch.tensor([[504, 3794, 314, 563, 260, 1645, 282]])
    decoded = [greedy_decode(smollm, state, state.logits, 6, stop_ids=()) for state in (ragged, padded)]
    assert decoded[0] == decoded[1]
    assert torch.equal(prefill(smollm, turn, ragged)[1], prefill(smollm, turn, padded)[1])
    again = [evict(s, rank(smollm, s, make_scorer("knorm")), Budget(tokens=40), allocation) for s in (ragged, padded)]
    assert [p.tolist() for p in again[0].positions] == [p.tolist() for p in again[1].positions]
    assert torch.equal(prefill(smollm, turn, again[0])[1], prefill(smollm, turn, again[1])[1])


@pytest.mark.model
def test_stacked_adaptive_cuts_hold_no_padding(smollm):
    """Cuts of other shapes stacked into one batch: the bytes held are the rows' own, not the padded batch's."""
    full, _ = prefill(smollm, torch.tensor([list(range(300, 420))]))
    scores = rank(smollm, full, make_scorer("knorm"))
    cuts = [evict(full, scores, Budget(tokens=24)), evict(full, scores, Budget(tokens=48), AdaKV())]
    batch = stack_states(cuts, pad=True)
    assert batch.nbytes() == sum(cut.nbytes() for cut in cuts)
