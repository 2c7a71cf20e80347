"""KVzap's fits: the closed-form ridge equals its slow reference, the MLP loop learns, and both become kvpress
KVzapModels computing what was fitted; R² is sklearn's (uniform average over heads)."""

from __future__ import annotations

import pytest
import torch

from kvpolicy.kvzap.config import MLPConfig
from kvpolicy.kvzap.fit import LayerwiseMLP, fit_mlp, fit_ridge, fit_ridge_reference, linear_model, mse, r_squared


def synthetic(n: int = 600, layers: int = 3, d: int = 12, heads: int = 2, noise: float = 0.1, seed: int = 0):
    """X (n, L, d) with an offset and per-dimension scales, y (n, L, H) linear in X plus noise."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, layers, d, generator=g) * torch.linspace(0.5, 3, d) + 2.0
    W, b = torch.randn(layers, d, heads, generator=g), torch.randn(layers, heads, generator=g)
    y = torch.einsum("nld,ldh->nlh", X, W) + b + noise * torch.randn(n, layers, heads, generator=g)
    return X, y


@pytest.mark.parametrize("alpha", [1.0, 25.0])
def test_ridge_equals_its_slow_reference(alpha):
    X, y = synthetic()
    W, b = fit_ridge(X.half(), y, alpha)  # fp16 inputs, as collected
    W_ref, b_ref = fit_ridge_reference(X.half(), y, alpha)
    assert torch.allclose(W, W_ref, atol=1e-5) and torch.allclose(b, b_ref, atol=1e-4)


def test_ridge_accumulates_in_chunks(monkeypatch):
    X, y = synthetic(n=1000)
    whole = fit_ridge(X, y)
    monkeypatch.setattr("kvpolicy.kvzap.fit.CHUNK", 64)
    chunked = fit_ridge(X, y)
    assert all(torch.allclose(a, c, atol=1e-5) for a, c in zip(whole, chunked))


def test_the_linear_kvzap_model_computes_the_fit():
    X, y = synthetic()
    W, b = fit_ridge(X, y)
    model = linear_model(W, b)
    assert torch.allclose(model(X), torch.einsum("nld,ldh->nlh", X, W) + b, atol=1e-4)
    assert r_squared(model, X, y).min() > 0.99


def test_the_mlp_learns_a_linear_target_and_converts_to_kvpress():
    X, y = synthetic(n=2000, noise=0.0)
    y = (y - y.mean()) / y.std()
    untrained = LayerwiseMLP(3, 12, 32, 2, torch.Generator().manual_seed(0))
    cfg = MLPConfig(hidden=32, epochs=6, lr=5e-3, batch=128, seed=0)
    model, history = fit_mlp(X, y, cfg)
    assert mse(model, X, y) < 0.2 * mse(untrained, X, y)
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["valid_loss"] is not None
    assert [h["epoch"] for h in history] == list(range(1, 7)) and history[0]["lr"] == cfg.lr
    assert torch.allclose(model.to_kvzap()(X), model(X), atol=1e-5)
    again, _ = fit_mlp(X, y, cfg)  # seeded: initialization, split and batches
    assert torch.equal(again.w1, model.w1)


def test_r_squared_is_sklearns_uniform_average():
    y = torch.tensor([[[1.0, 2.0]], [[2.0, 4.0]], [[3.0, 9.0]]])  # (n=3, L=1, H=2)

    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[[2.0, 3.0]]]).expand(x.shape[0], 1, 2)

    # head 0: prediction = its mean -> 0; head 1: sse 1 + 1 + 36 = 38, sst (5-2)^2 + (5-4)^2 + (5-9)^2 = 26
    expected = (0.0 + (1 - 38 / 26)) / 2
    assert r_squared(Constant(), torch.zeros(3, 1, 4), y).item() == pytest.approx(expected)
