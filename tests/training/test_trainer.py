"""The trainer: schedule, per-agent clipping, learning a known utility to near-oracle, NaN skipping, bad input."""

from __future__ import annotations

import math
import re

import pytest
import torch

from kvpolicy.errors import KVPError
from kvpolicy.policy import ranking as R
from kvpolicy.policy.protocol import RECENT, SINKS
from kvpolicy.training.data import TraceBatches
from kvpolicy.policy.network import PolicyConfig
from kvpolicy.training.synthetic import SyntheticTraces
from kvpolicy.training.trainer import TrainConfig, Trainer, clip_per_agent, learning_rate

SHAPE = dict(n_layers=2, n_kv_heads=2, head_dim=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def _fast(**kw) -> TrainConfig:
    base = dict(steps=250, batch=8, tokens=64, samples=4, lr=1e-2, warmup=20, ema_start=20, val_every=50,
                checkpoint_every=1000, val_samples=4, compile=False, bf16=False)
    return TrainConfig(**(base | kw))


def _policy(length: int = 128) -> PolicyConfig:
    return PolicyConfig(**SHAPE, hidden=32, max_position=length)


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=1000, lr=1e-3, warmup=100, min_lr=1e-6)
    assert learning_rate(0, cfg) == pytest.approx(1e-5)
    assert learning_rate(99, cfg) == pytest.approx(1e-3)
    assert learning_rate(100, cfg) == pytest.approx(1e-3)
    assert learning_rate(999, cfg) == pytest.approx(1e-6)
    mid = learning_rate(100 + 899 // 2, cfg)
    assert mid == pytest.approx((1e-3 + 1e-6) / 2, rel=1e-2)
    lrs = [learning_rate(s, cfg) for s in range(100, 1000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay after warm-up


def test_clip_per_agent_scales_each_agent_separately():
    w = torch.nn.Parameter(torch.zeros(3, 4))
    b = torch.nn.Parameter(torch.zeros(3))
    w.grad = torch.tensor([[3.0, 4.0, 0, 0], [0.3, 0.4, 0, 0], [30.0, 40.0, 0, 0]])
    b.grad = torch.zeros(3)
    norms = clip_per_agent([w, b], max_norm=5.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5, 50.0]))
    torch.testing.assert_close(w.grad[1], torch.tensor([0.3, 0.4, 0, 0]))  # below the limit: untouched
    torch.testing.assert_close(w.grad[2].norm(), torch.tensor(5.0), rtol=1e-4, atol=1e-4)


def _val_cost(trainer: Trainer, scores_fn) -> float:
    """Mean normalized cost of the validation prompts, ranking the tokens between the sinks and the recent window."""
    data, evictable = TraceBatches(trainer.val_source, 0), slice(SINKS, -RECENT)
    batches = [data.full(i) for i in trainer.val_ids]
    costs = [R.normalized_cost(b.utility[..., evictable], R.argsort_desc(scores_fn(b)[..., evictable])).mean()
             for b in batches]
    return float(torch.stack(costs).mean())


def test_learns_a_known_utility_to_near_oracle(tmp_path):
    """Utility is a softmax of a fixed projection of the key: the trained EMA policy must rank almost like the
    oracle (cost ratio near 1) where a random ranking is ~15x worse. A broken gradient sign, baseline or
    log-probability leaves it far from that."""
    train, val = SyntheticTraces(64, length=128, **SHAPE, seed=0), SyntheticTraces(4, length=128, **SHAPE, seed=1)
    trainer = Trainer(train, tmp_path / "ckpt", val=val, policy=_policy(), config=_fast(), progress=False)
    random_cost = _val_cost(trainer, lambda b: torch.randn_like(b.utility))
    result = trainer.run()
    assert random_cost > 5
    assert -result.best_val_reward < 1.2, result.val_history
    # the validation reward is what an independent evaluation of the deployed (best EMA) weights gives
    trainer.eval_net.load_state_dict(dict(zip(trainer.names, trainer.best)))
    deployed = _val_cost(trainer, lambda b: trainer.eval_net(b.keys, b.values, b.positions, b.lengths))
    assert deployed == pytest.approx(-result.best_val_reward, rel=1e-4)
    # per-layer logs
    last = result.history[-1]
    assert len(last["reward_per_layer"]) == 2 and len(last["grad_norm_per_layer"]) == 2
    assert len(last["advantage_abs_per_layer"]) == 2 and last["step"] == 250
    assert result.steps_per_s > 0 and result.tokens_per_s == pytest.approx(result.steps_per_s * 8 * 64)


class _PoisonedTraces(SyntheticTraces):
    """Sample 0 has NaN keys (a corrupted trace that passed its checksum)."""

    def read_layers(self, sample, layers=None):
        t = super().read_layers(sample, layers)
        if sample == 0:
            t.keys[0, 0, 5] = float("nan")
        return t


def test_non_finite_batches_are_skipped_and_counted(tmp_path):
    train = _PoisonedTraces(16, length=128, **SHAPE, seed=0)  # a few batches draw the poisoned sample, most do not
    val = SyntheticTraces(2, length=128, **SHAPE, seed=1)
    trainer = Trainer(train, tmp_path / "ckpt", val=val, policy=_policy(),
                      config=_fast(steps=12, batch=4, val_every=6, warmup=2, ema_start=2), progress=False)
    with pytest.warns(UserWarning, match="skipped a batch with non-finite values") as caught:
        result = trainer.run()
    assert 0 < result.skipped_batches <= 6  # more than half would fail the run (tests/faults/test_fault_training.py)
    assert len([w for w in caught if "skipped a batch" in str(w.message)]) == result.skipped_batches
    assert all(torch.isfinite(p).all() for p in trainer.net.parameters())
    assert all(torch.isfinite(e).all() for e in trainer.ema)
    assert math.isfinite(result.best_val_reward)


def test_ema_follows_the_weights_until_ema_start_then_lags(tmp_path):
    train = SyntheticTraces(8, length=128, **SHAPE)
    trainer = Trainer(train, tmp_path / "c", policy=_policy(), config=_fast(steps=10, ema_start=5, warmup=2),
                      progress=False)
    for _ in range(5):
        trainer.train_step()
        trainer.step += 1
    assert all(torch.equal(e, p) for e, p in zip(trainer.ema, trainer.params))
    before = [e.clone() for e in trainer.ema]
    trainer.train_step()
    for b, e, p in zip(before, trainer.ema, trainer.params):
        torch.testing.assert_close(e, 0.99 * b + 0.01 * p.detach())


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(KVPError, match="empty"):
        Trainer(SyntheticTraces(0, **SHAPE), tmp_path / "a", policy=_policy(), config=_fast(), progress=False)
    other = SyntheticTraces(2, length=128, n_layers=3, n_kv_heads=2, head_dim=16)
    with pytest.raises(KVPError, match="another model"):
        Trainer(SyntheticTraces(4, length=128, **SHAPE), tmp_path / "b", val=other, config=_fast(), progress=False)
    with pytest.raises(KVPError, match="evictable"):
        Trainer(SyntheticTraces(4, length=20, **SHAPE), tmp_path / "c", config=_fast(), progress=False)
    with pytest.raises(KVPError, match="batch >= 2"):
        TrainConfig(samples=1, batch=1)
    with pytest.raises(KVPError, match="steps"):
        TrainConfig(steps=0)


def test_kvp_train_refuses_a_corrupted_trace_set_without_writing(tmp_path, capsys):
    from kvpolicy.cli import main
    from kvpolicy.training.synthetic import write_synthetic_traces

    traces = write_synthetic_traces(tmp_path / "traces", SyntheticTraces(4, length=64, **SHAPE))
    shard = sorted(traces.glob("shard-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # flip bits inside the last tensor: same size, wrong checksum
    shard.write_bytes(bytes(data))
    argv = ["train", "--traces", str(traces), "--out", str(tmp_path / "ckpt"), "--steps", "2", "--no-compile"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "corrupted" in err and shard.name in err
    assert not (tmp_path / "ckpt").exists()
    assert main(["train", "--traces", str(tmp_path / "nothing"), "--out", str(tmp_path / "ckpt")]) == 1
    assert "no manifest.json" in capsys.readouterr().err


def test_kvp_train_reads_its_reward_beside_the_best_attention_free_heuristic(tmp_path, capsys):
    """The best validation reward is printed with the best attention-free heuristic's on the same validation traces,
    in the same measure: the deployed policy, measured as the heuristics are, gives the reward printed."""
    from kvpolicy.cli import main
    from kvpolicy.compression.catalog import attention_free
    from kvpolicy.evaluation.bench.ranking_quality import evaluate, scorer_method
    from kvpolicy.evaluation.lineup import make_contenders
    from kvpolicy.traces.store import TraceReader
    from kvpolicy.training.synthetic import write_synthetic_traces

    train = write_synthetic_traces(tmp_path / "train", SyntheticTraces(8, length=64, **SHAPE, seed=0))
    val = write_synthetic_traces(tmp_path / "val", SyntheticTraces(3, length=64, **SHAPE, seed=1))
    ckpt = tmp_path / "ckpt"
    assert main(["train", "--traces", str(train), "--val", str(val), "--out", str(ckpt), "--steps", "4", "--batch",
                 "4", "--tokens", "32", "--hidden", "8", "--val-every", "2", "--warmup", "1", "--no-compile",
                 "--no-bf16"]) == 0
    said = re.search(r"best validation reward (\S+) at step \d+ \(-1 = oracle; best attention-free heuristic on "
                     r"these traces: (.+) (\S+)\);", capsys.readouterr().out)
    assert said, "kvp train printed no heuristic beside its reward"
    reader = TraceReader(val)
    contenders = make_contenders([f"kvp:{ckpt}", *attention_free()])
    costs = evaluate(reader, {c.label: scorer_method(reader, c) for c in contenders}, (), SINKS, RECENT)
    rewards = {c.label: -costs[c.label]["normalized_cost"] for c in contenders}
    assert float(said[1]) == pytest.approx(rewards.pop("KVP"), abs=1e-3)  # the reward, as the heuristics are measured
    assert said[2] == max(rewards, key=rewards.get) and float(said[3]) == pytest.approx(max(rewards.values()), abs=1e-4)
    assert float(said[3]) < -1  # a heuristic, not the oracle


class _CompilerError(Exception):
    """Stands for an error raised inside torch.compile's compiler."""


_CompilerError.__module__ = "torch._inductor.exc"


def test_a_compiler_failure_falls_back_to_eager_once_and_other_errors_propagate():
    from kvpolicy.training.forward import with_eager_fallback

    calls, eager = [], []

    def step():
        calls.append(len(eager))
        if not eager:
            raise _CompilerError("no C compiler")
        return "stepped"

    with pytest.warns(UserWarning, match="torch.compile failed here"):
        assert with_eager_fallback(step, lambda: eager.append(True)) == "stepped"
    assert calls == [0, 1] and eager == [True]  # retried once, after going eager

    def broken():
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        with_eager_fallback(broken, lambda: pytest.fail("fell back on an error that is not the compiler's"))


def test_prompts_trains_on_the_first_traces_only(tmp_path):
    train, val = SyntheticTraces(8, length=64, **SHAPE), SyntheticTraces(2, length=64, **SHAPE, seed=1)
    trainer = Trainer(train, tmp_path / "c", val=val, policy=_policy(), config=_fast(prompts=3), progress=False)
    assert trainer.train_ids == [0, 1, 2]
    with pytest.raises(KVPError, match="more training traces than the 8"):
        Trainer(train, tmp_path / "d", val=val, policy=_policy(), config=_fast(prompts=9), progress=False)
    with pytest.raises(KVPError, match="number of training traces"):
        TrainConfig(prompts=-1)
