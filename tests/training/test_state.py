"""The resume state: weights, EMA, best EMA and AdamW moments survive a pack/unpack exactly, and a checkpoint of
another model, policy, trace set or setting is refused (resumable settings aside)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvpolicy.errors import KVPError
from kvpolicy.training.state import RESUMABLE, check_resumable, pack_resume, unpack_resume


def _run(seed: int):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.AdamW(params, lr=0.1)
    sum(p.sum() for p in params).backward()
    opt.step()
    ema = [p.detach() * 0.5 for p in params]
    best = [p.detach() * 0.25 for p in params]
    return params, ema, best, opt


def test_pack_and_unpack_restore_weights_averages_and_optimizer_moments():
    names = ["w", "b"]
    params, ema, best, opt = _run(0)
    tensors = pack_resume(names, params, ema, best, opt)
    assert set(tensors) == {f"{kind}.{n}" for kind in ("param", "ema", "best") for n in names} | {
        f"adam.{n}.{k}" for n in names for k in ("step", "exp_avg", "exp_avg_sq")}
    fresh_params, fresh_ema, fresh_best, fresh_opt = _run(1)
    unpack_resume(tensors, names, fresh_params, fresh_ema, fresh_best, fresh_opt, torch.device("cpu"))
    for a, b in zip(params + ema + best, fresh_params + fresh_ema + fresh_best):
        assert torch.equal(a, b)
    for p, q in zip(params, fresh_params):
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][k], fresh_opt.state[q][k])
        assert float(opt.state[p]["step"]) == float(fresh_opt.state[q]["step"])


def test_only_resumable_settings_may_differ():
    mine = {"model": {"name": "m"}, "policy": {"hidden": 8}, "traces": {"train": {"manifest_hash": "h"}},
            "training": {"lr": 0.01, **{k: 1 for k in RESUMABLE}}}
    check_resumable(mine | {"training": {"lr": 0.01, **{k: 2 for k in RESUMABLE}}}, mine, Path("c"))
    with pytest.raises(KVPError, match="another model"):
        check_resumable(mine | {"model": {"name": "other"}}, mine, Path("c"))
    with pytest.raises(KVPError, match="another policy"):
        check_resumable(mine | {"policy": {"hidden": 16}}, mine, Path("c"))
    with pytest.raises(KVPError, match="c was trained on other traces"):
        check_resumable(mine | {"traces": {"train": {"manifest_hash": "x"}}}, mine, Path("c"))
    with pytest.raises(KVPError, match=r"other settings \(lr\)"):
        check_resumable(mine | {"training": {**mine["training"], "lr": 0.1}}, mine, Path("c"))
