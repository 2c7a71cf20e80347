"""PolicyNet: the batched all-agents network equals one plain nn.Module network per agent."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kvpolicy.errors import KVPError
from kvpolicy.policy import network
from kvpolicy.policy.network import PolicyConfig, PolicyNet


def _linear(w: torch.Tensor, b: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(w.shape[0], w.shape[1])
    layer.weight.data, layer.bias.data = w.T.clone(), b.clone()
    return layer


def _norm(w: torch.Tensor, b: torch.Tensor) -> nn.LayerNorm:
    layer = nn.LayerNorm(w.shape[0])
    layer.weight.data, layer.bias.data = w.clone(), b.clone()
    return layer


def reference_agent(net: PolicyNet, a: int, keys, values, positions, length, states=None) -> torch.Tensor:
    """The paper's network for agent `a` written plainly: keys/values (T, d), positions (T,), the layer's hidden
    states (T, D) for a policy that reads them -> scores (T,)."""
    p = {name: t[a].detach() for name, t in net.named_parameters()}
    cfg = net.config
    k = _norm(p["key_ln_w"], p["key_ln_b"])(_linear(p["key_w"], p["key_b"])(keys))
    v = _norm(p["value_ln_w"], p["value_ln_b"])(_linear(p["value_w"], p["value_b"])(values))
    pos = torch.zeros(len(positions), cfg.position_dim)
    if cfg.position_encoding in ("absolute", "both"):
        table = nn.Embedding.from_pretrained(p["position_table"])
        pos = pos + table(positions.clamp(max=cfg.max_position - 1))
    if cfg.position_encoding in ("relative", "both"):
        feats = torch.stack(
            [positions / length, torch.log1p((length - 1 - positions).float()), torch.log1p(positions.float())], -1
        )
        pos = pos + _linear(p["position_w"], p["position_b"])(feats)
    pos = _norm(p["position_ln_w"], p["position_ln_b"])(pos)
    parts = [k, v, pos]
    if cfg.hidden_state_dim:
        parts.append(_norm(p["state_ln_w"], p["state_ln_b"])(_linear(p["state_w"], p["state_b"])(states)))
    x = torch.cat(parts, -1)
    x = F.silu(_norm(p["ln1_w"], p["ln1_b"])(_linear(p["fc1_w"], p["fc1_b"])(x)))
    x = F.silu(_norm(p["ln2_w"], p["ln2_b"])(_linear(p["fc2_w"], p["fc2_b"])(x)))
    return _linear(p["out_w"], p["out_b"])(x).squeeze(-1)


@pytest.mark.parametrize("encoding", ["absolute", "relative", "both"])
def test_batched_forward_equals_per_agent_reference(encoding):
    torch.manual_seed(0)
    cfg = PolicyConfig(n_layers=3, n_kv_heads=2, head_dim=8, hidden=12, position_dim=6, max_position=40,
                       position_encoding=encoding)
    net = PolicyNet(cfg)
    with torch.no_grad():  # non-trivial norms: their affine is folded into fc1, which must hold for any values
        for name, p in net.named_parameters():
            if "ln" in name:
                p.add_(torch.randn_like(p))
    a, b, t = cfg.n_agents, 2, 30
    keys, values = torch.randn(a, b, t, 8), torch.randn(a, b, t, 8)
    positions = torch.stack([torch.randperm(60)[:t].sort().values for _ in range(a * b)]).reshape(a, b, t)
    lengths = torch.tensor([60, 70]).reshape(1, b, 1)
    scores = net(keys, values, positions, lengths)
    assert scores.shape == (a, b, t) and scores.dtype == torch.float32
    for ai in range(a):
        for bi in range(b):
            ref = reference_agent(net, ai, keys[ai, bi], values[ai, bi], positions[ai, bi], int(lengths[0, bi, 0]))
            torch.testing.assert_close(scores[ai, bi], ref, rtol=1e-4, atol=1e-4)


def test_hidden_state_branch_equals_per_agent_reference():
    torch.manual_seed(3)
    cfg = PolicyConfig(n_layers=3, n_kv_heads=2, head_dim=8, hidden=12, position_dim=6, hidden_state_dim=10,
                       hidden_state_features=5)
    net = PolicyNet(cfg)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "ln" in name:
                p.add_(torch.randn_like(p))
    a, b, t = cfg.n_agents, 2, 17
    keys, values = torch.randn(a, b, t, 8), torch.randn(a, b, t, 8)
    positions = torch.arange(t).expand(1, b, t)
    lengths = torch.tensor([t, t]).reshape(1, b, 1)
    states = torch.randn(cfg.n_layers, b, t, 10)
    scores = net(keys, values, positions, lengths, states=states)
    for ai in range(a):
        for bi in range(b):
            ref = reference_agent(net, ai, keys[ai, bi], values[ai, bi], positions[0, bi], t,
                                  states[ai // cfg.n_kv_heads, bi])
            torch.testing.assert_close(scores[ai, bi], ref, rtol=1e-4, atol=1e-4)
    layer = slice(2, 4)  # the agents of layer 1 read that layer's states only
    torch.testing.assert_close(net(keys[layer], values[layer], positions, lengths, layer, states[1:2]), scores[layer])
    with pytest.raises(KVPError, match="hidden states"):
        net(keys, values, positions, lengths)


def test_score_layer_uses_that_layers_agents_and_shared_positions():
    torch.manual_seed(1)
    cfg = PolicyConfig(n_layers=4, n_kv_heads=3, head_dim=8, hidden=8, max_position=64)
    net = PolicyNet(cfg)
    bsz, h, t = 2, 3, 20
    keys, values = torch.randn(bsz, h, t, 8), torch.randn(bsz, h, t, 8)
    positions = torch.arange(t).expand(bsz, h, t)
    out = net.score_layer(2, keys, values, positions)
    assert out.shape == (bsz, h, t)
    lengths = torch.full((1, bsz, 1), t)
    direct = net(keys.transpose(0, 1), values.transpose(0, 1), positions.transpose(0, 1), lengths, slice(6, 9))
    torch.testing.assert_close(out, direct.transpose(0, 1))
    # shared positions (1, B, T) broadcast over agents
    shared = net(keys.transpose(0, 1), values.transpose(0, 1), positions[:, 0].unsqueeze(0), lengths, slice(6, 9))
    torch.testing.assert_close(shared, direct)
    with pytest.raises(KVPError, match="4 layers x 3 KV heads"):
        net.score_layer(4, keys, values, positions)
    with pytest.raises(KVPError, match="KV heads"):
        net.score_layer(0, keys[:, :2], values[:, :2], positions[:, :2])


def test_agents_are_independent_and_all_parameters_get_gradients():
    torch.manual_seed(2)
    cfg = PolicyConfig(n_layers=2, n_kv_heads=2, head_dim=8, hidden=8, max_position=32)
    net = PolicyNet(cfg)
    keys, values = torch.randn(4, 1, 10, 8), torch.randn(4, 1, 10, 8)
    pos, length = torch.arange(10).reshape(1, 1, 10), torch.full((1, 1, 1), 10)
    before = net(keys, values, pos, length).detach()
    with torch.no_grad():
        net.fc2_w[1].add_(torch.randn_like(net.fc2_w[1]))
    after = net(keys, values, pos, length)
    assert not torch.allclose(after[1], before[1])
    torch.testing.assert_close(after[[0, 2, 3]], before[[0, 2, 3]])
    after.sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_inference_folds_once_and_refolds_after_an_in_place_update():
    torch.manual_seed(5)
    net = PolicyNet(PolicyConfig(n_layers=2, n_kv_heads=2, head_dim=8, hidden=8, max_position=32))
    keys, values = torch.randn(2, 1, 10, 8), torch.randn(2, 1, 10, 8)
    pos, length = torch.arange(10).reshape(1, 1, 10), torch.full((1, 1, 1), 10)
    with torch.no_grad():
        first = net(keys, values, pos, length, slice(2, 4))
        assert net.folded(slice(2, 4), torch.float32) is net.folded(slice(2, 4), torch.float32)
        net.ln2_w.mul_(-1.0)  # what an optimizer step or an EMA copy does
        second = net(keys, values, pos, length, slice(2, 4))
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, net(keys, values, pos, length, slice(2, 4)).detach())  # = folding afresh
    with torch.no_grad():
        cached = net.folded(slice(2, 4), torch.float32)
        net.to(torch.float64)  # a move replaces the storage without bumping versions: the cache must not survive it
        assert net.folded(slice(2, 4), torch.float32) is not cached


def test_positions_beyond_the_table_are_clamped_and_relative_features_stay_finite():
    torch.manual_seed(3)
    cfg = PolicyConfig(n_layers=1, n_kv_heads=1, head_dim=8, hidden=8, max_position=16, position_encoding="absolute")
    net = PolicyNet(cfg)
    k, v = torch.randn(1, 1, 3, 8).expand(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
    k = k[:, :, :1].expand(1, 1, 3, 8)
    v = v[:, :, :1].expand(1, 1, 3, 8)
    scores = net(k, v, torch.tensor([[[15, 100, 100_000]]]), torch.full((1, 1, 1), 100_001))
    assert torch.allclose(scores[0, 0, 0], scores[0, 0, 1]) and torch.allclose(scores[0, 0, 1], scores[0, 0, 2])
    relative = PolicyNet(
        PolicyConfig(n_layers=1, n_kv_heads=1, head_dim=8, max_position=16, position_encoding="relative")
    )
    far = relative(k, v, torch.tensor([[[0, 50_000, 99_999]]]), torch.full((1, 1, 1), 100_000))
    assert torch.isfinite(far).all()


def test_bf16_forward_is_close_to_fp32():
    torch.manual_seed(4)
    net = PolicyNet(PolicyConfig(n_layers=2, n_kv_heads=2, head_dim=16, hidden=16, max_position=64))
    keys, values = torch.randn(4, 2, 32, 16), torch.randn(4, 2, 32, 16)
    pos, length = torch.arange(32).expand(1, 2, 32), torch.full((1, 2, 1), 32)
    full = net(keys, values, pos, length)
    half = net(keys.bfloat16(), values.bfloat16(), pos, length)
    assert half.dtype == torch.float32
    assert (half - full).abs().max() < 0.1 * full.abs().max()


def test_config_validation():
    with pytest.raises(KVPError, match="hidden"):
        PolicyConfig(n_layers=1, n_kv_heads=1, head_dim=8, hidden=0)
    with pytest.raises(KVPError, match="position_encoding"):
        PolicyConfig(n_layers=1, n_kv_heads=1, head_dim=8, position_encoding="rope")
    net = PolicyNet(PolicyConfig(n_layers=1, n_kv_heads=1, head_dim=8))
    with pytest.raises(KVPError, match="head_dim 8"):
        net(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16), torch.arange(4).reshape(1, 1, 4),
            torch.full((1, 1, 1), 4))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 0.0), (torch.bfloat16, 2e-2)])
def test_score_layers_equals_each_layer_scored_alone(dtype, tolerance):
    torch.manual_seed(2)
    cfg = PolicyConfig(n_layers=4, n_kv_heads=3, head_dim=8, hidden=8, max_position=64)
    net = PolicyNet(cfg).to(dtype)
    bsz, h, t = 2, 3, 20
    keys = [torch.randn(bsz, h, t, 8, dtype=dtype) for _ in range(cfg.n_layers)]
    values = [torch.randn(bsz, h, t, 8, dtype=dtype) for _ in range(cfg.n_layers)]
    positions = [torch.stack([torch.randperm(40)[:t].sort().values for _ in range(bsz * h)]).reshape(bsz, h, t)
                 for _ in range(cfg.n_layers)]
    lengths = torch.tensor([45, 50])
    together = net.score_layers(keys, values, positions, lengths)
    for layer in range(cfg.n_layers):
        alone = net.score_layer(layer, keys[layer], values[layer], positions[layer], lengths)
        # fp32: the same arithmetic, bit for bit; bf16: matmuls of other batch sizes may round otherwise
        torch.testing.assert_close(together[layer], alone, rtol=tolerance, atol=tolerance)
    with pytest.raises(KVPError, match="all 4 layers' caches of one shape"):
        net.score_layers(keys[:3], values[:3], positions[:3])


def test_rows_scored_in_parts_give_the_scores_of_one_part_per_agent(monkeypatch):
    """On CPU each agent's rows are split so that its threads share the batched matmuls evenly (`_row_parts`); the
    scores are those of the unsplit network, bit for bit, for tensor and per-layer inputs."""
    torch.manual_seed(4)
    cfg = PolicyConfig(n_layers=2, n_kv_heads=3, head_dim=8, hidden=12, position_dim=6, position_encoding="both")
    net = PolicyNet(cfg)
    t = 2 * network.MIN_PART_ROWS
    keys, values = torch.randn(6, 1, t, 8), torch.randn(6, 1, t, 8)
    positions, lengths = torch.arange(t).expand(1, 1, t), torch.full((1, 1, 1), t)
    monkeypatch.setattr(network.torch, "get_num_threads", lambda: 2)
    assert network._row_parts(3, t, torch.device("cpu")) == 2 and network._row_parts(2, t, torch.device("cpu")) == 1
    assert network._row_parts(3, t + 1, torch.device("cpu")) == 1  # odd rows: never a copy to split them
    assert network._row_parts(3, t, torch.device("meta")) == 1
    with torch.no_grad():
        split = [net(keys, values, positions, lengths), net([keys[:3], keys[3:]], [values[:3], values[3:]], positions,
                                                             lengths)]
        monkeypatch.setattr(network, "_row_parts", lambda *args: 1)
        whole = net(keys, values, positions, lengths)
    assert all(torch.equal(s, whole) for s in split)


def test_inference_in_place_gives_the_scores_autograd_gives_and_leaves_its_inputs_alone():
    torch.manual_seed(5)
    cfg = PolicyConfig(n_layers=2, n_kv_heads=2, head_dim=8, hidden=12, position_dim=6, position_encoding="both",
                       hidden_state_dim=10, hidden_state_features=4)
    net = PolicyNet(cfg)
    keys, values, states = torch.randn(4, 2, 40, 8), torch.randn(4, 2, 40, 8), torch.randn(2, 2, 40, 10)
    positions, lengths = torch.arange(40).expand(1, 2, 40), torch.full((1, 2, 1), 40)
    copies = [x.clone() for x in (keys, values, states, positions)]
    trained = net(keys, values, positions, lengths, states=states)
    assert trained.requires_grad
    with torch.no_grad():
        inferred = net(keys, values, positions, lengths, states=states)
    assert torch.equal(inferred, trained.detach())
    assert all(torch.equal(x, c) for x, c in zip((keys, values, states, positions), copies))
