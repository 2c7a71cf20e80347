"""Fitting KVzap's models, every layer at once: inputs X (n, L, hidden) -> log KVzip+ scores y (n, L, H).

linear: ridge regression per layer, with an unpenalized intercept (sklearn's `Ridge(alpha=1)`, which NVIDIA's
kvzap/train.py fits), in closed form on the centered data, accumulated in float64; `fit_ridge_reference` is the
slow, obviously-correct version (one augmented least-squares solve per layer and head) the tests compare it to.
mlp: a Linear-GELU-Linear per layer, trained as NVIDIA trains it (skorch there, a plain loop here): AdamW, cosine
annealing per epoch, MSE, the gradient norm clipped, a validation split held out; the layers' MLPs are one module
with parameters stacked on a layer axis. Both become kvpress's `KVzapModel` (`linear_model`, `LayerwiseMLP.to_kvzap`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel
from torch import nn

from kvpolicy.kvzap.config import MLPConfig
from kvpolicy.progress import bar

CHUNK = 4096  # rows accumulated at a time (float64 copies of X stay ~100 MB)


def fit_ridge(X: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer l: argmin_{W, b} ||y_l - X_l W - b||² + alpha ||W||². X (n, L, d), y (n, L, H) ->
    (W (L, d, H), b (L, H)) float32. The intercept is the mean target minus the mean input's prediction."""
    n, n_layers, d = X.shape
    sx = torch.zeros(n_layers, d, dtype=torch.float64)
    sy = torch.zeros(n_layers, y.shape[2], dtype=torch.float64)
    sxx = torch.zeros(n_layers, d, d, dtype=torch.float64)
    sxy = torch.zeros(n_layers, d, y.shape[2], dtype=torch.float64)
    for xs, ys in zip(X.split(CHUNK), y.split(CHUNK)):
        xs, ys = xs.double().transpose(0, 1), ys.double().transpose(0, 1)  # (L, c, d), (L, c, H)
        sx += xs.sum(1)
        sy += ys.sum(1)
        sxx += xs.transpose(1, 2) @ xs
        sxy += xs.transpose(1, 2) @ ys
    mx, my = sx / n, sy / n
    gram = sxx - n * mx.unsqueeze(2) * mx.unsqueeze(1)  # centered X^T X
    cross = sxy - n * mx.unsqueeze(2) * my.unsqueeze(1)  # centered X^T y
    factor = torch.linalg.cholesky(gram + alpha * torch.eye(d, dtype=torch.float64))  # positive definite if alpha > 0
    W = torch.cholesky_solve(cross, factor)
    b = my - torch.einsum("ld,ldh->lh", mx, W)
    return W.float(), b.float()


def fit_ridge_reference(X: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`fit_ridge`, slowly: per layer and head, the normal equations of [X, 1] with the penalty on W alone."""
    n, n_layers, d = X.shape
    W, b = torch.zeros(n_layers, d, y.shape[2]), torch.zeros(n_layers, y.shape[2])
    penalty = alpha * torch.eye(d + 1, dtype=torch.float64)
    penalty[d, d] = 0.0
    for layer in range(n_layers):
        A = torch.cat([X[:, layer].double(), torch.ones(n, 1, dtype=torch.float64)], dim=1)
        for head in range(y.shape[2]):
            theta = torch.linalg.solve(A.T @ A + penalty, A.T @ y[:, layer, head].double())
            W[layer, :, head], b[layer, head] = theta[:d].float(), theta[d].float()
    return W, b


def linear_model(W: torch.Tensor, b: torch.Tensor) -> KVzapModel:
    """kvpress's linear KVzapModel with layer l's nn.Linear computing x @ W[l] + b[l]; W (L, d, H), b (L, H)."""
    n_layers, d, heads = W.shape
    model = KVzapModel(KVzapConfig(input_dim=d, output_dim=heads, n_modules=n_layers, hidden_dim=None))
    with torch.no_grad():
        for layer, linear in enumerate(model.layers):
            linear.weight.copy_(W[layer].T)
            linear.bias.copy_(b[layer])
    return model.eval()


class LayerwiseMLP(nn.Module):
    """Every layer's Linear-GELU-Linear as one module: x (n, L, d) -> (n, L, H), layer l's MLP on x[:, l].
    Initialized as nn.Linear is (uniform in ±1/sqrt(fan_in)), from `generator`."""

    def __init__(self, n_layers: int, d: int, hidden: int, heads: int, generator: torch.Generator):
        super().__init__()

        def uniform(*shape: int, fan_in: int) -> nn.Parameter:
            bound = 1 / math.sqrt(fan_in)
            return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound, generator=generator))

        self.w1, self.b1 = uniform(n_layers, d, hidden, fan_in=d), uniform(n_layers, hidden, fan_in=d)
        self.w2, self.b2 = uniform(n_layers, hidden, heads, fan_in=hidden), uniform(n_layers, heads, fan_in=hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(torch.einsum("nld,ldk->nlk", x, self.w1) + self.b1)
        return torch.einsum("nlk,lkh->nlh", h, self.w2) + self.b2

    def to_kvzap(self) -> KVzapModel:
        """kvpress's MLP KVzapModel computing the same function."""
        n_layers, d, hidden = self.w1.shape
        model = KVzapModel(KVzapConfig(input_dim=d, output_dim=self.w2.shape[2], n_modules=n_layers,
                                       hidden_dim=hidden))
        with torch.no_grad():
            for layer, (first, _, second) in enumerate(model.layers):
                first.weight.copy_(self.w1[layer].T)
                first.bias.copy_(self.b1[layer])
                second.weight.copy_(self.w2[layer].T)
                second.bias.copy_(self.b2[layer])
        return model.eval()


def fit_mlp(X: torch.Tensor, y: torch.Tensor, cfg: MLPConfig) -> tuple[LayerwiseMLP, list[dict]]:
    """Train the layers' MLPs on X (n, L, d), y (n, L, H) (fp16 inputs are cast per batch); returns the model and
    one record per epoch (train loss, validation loss on the held-out `valid_fraction`, learning rate)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    model = LayerwiseMLP(X.shape[1], X.shape[2], cfg.hidden or max(1, X.shape[2] // 8), y.shape[2], generator)
    order = torch.randperm(X.shape[0], generator=generator)
    n_valid = round(cfg.valid_fraction * X.shape[0])
    valid, train = order[:n_valid], order[n_valid:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    history = []
    steps = math.ceil(len(train) / cfg.batch)
    with bar(total=cfg.epochs * steps, desc="kvzap mlp", unit="batch") as progress:
        for epoch in range(cfg.epochs):
            lr, total = schedule.get_last_lr()[0], 0.0
            for rows in train[torch.randperm(len(train), generator=generator)].split(cfg.batch):
                loss = F.mse_loss(model(X[rows].float()), y[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                optimizer.step()
                total += loss.item() * len(rows)
                progress.update(1)
            schedule.step()
            history.append({"epoch": epoch + 1, "lr": lr, "train_loss": total / len(train),
                            "valid_loss": mse(model, X[valid], y[valid]) if n_valid else None})
            progress.set_postfix(loss=f"{history[-1]['train_loss']:.3f}")
    return model.eval().requires_grad_(False), history


@torch.no_grad()
def mse(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared error of `model`'s predictions of y (n, L, H) from X (n, L, d), over every entry."""
    chunks = zip(X.split(CHUNK), y.split(CHUNK))
    return float(sum(F.mse_loss(model(xs.float()), ys, reduction="sum") for xs, ys in chunks) / y.numel())


@torch.no_grad()
def r_squared(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """R² per layer (L,) of `model`'s predictions of y (n, L, H) from X (n, L, d): 1 - SSE / SST of each layer and
    KV head, averaged over the heads (sklearn's r2_score, uniform average over outputs)."""
    pred = torch.cat([model(xs.float()) for xs in X.split(CHUNK)])
    sse = (pred - y).square().sum(0)
    sst = (y - y.mean(0)).square().sum(0)
    return (1 - sse / sst).mean(1)
