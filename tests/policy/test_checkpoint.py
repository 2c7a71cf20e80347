"""Checkpoints: round trip, refusals (other shape, damage; other weights warned about), atomic writes, resume after a
crash."""

from __future__ import annotations

import json

import pytest
import torch

from kvpolicy.errors import KVPError
from kvpolicy.models.handle import ModelInfo
from kvpolicy.policy import checkpoint as ckpt
from kvpolicy.policy.network import PolicyConfig, PolicyNet
from kvpolicy.training.synthetic import SyntheticTraces
from kvpolicy.training.trainer import TrainConfig, Trainer

SHAPE = dict(n_layers=2, n_kv_heads=2, head_dim=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**kw) -> TrainConfig:
    base = dict(steps=30, batch=4, tokens=32, samples=2, lr=1e-2, warmup=5, ema_start=5, val_every=10,
                checkpoint_every=10, val_samples=2, compile=False, bf16=False)
    return TrainConfig(**(base | kw))


def _trainer(out, **kw) -> Trainer:
    train = SyntheticTraces(8, length=64, **SHAPE, seed=0)
    val = SyntheticTraces(2, length=64, **SHAPE, seed=1)
    return Trainer(train, out, val=val, policy=PolicyConfig(**SHAPE, hidden=8, max_position=64), config=_config(**kw),
                   progress=False)


def _info(fingerprint: str = "synthetic-1234-2x2x16", **kw) -> ModelInfo:
    base = dict(name="synthetic", family="test", n_layers=2, n_kv_heads=2, n_query_heads=4, head_dim=16,
                max_positions=1024, fingerprint=fingerprint)
    return ModelInfo(**(base | kw))


def test_trained_checkpoint_round_trip_and_config(tmp_path):
    out = tmp_path / "ckpt"
    trainer = _trainer(out)
    result = trainer.run()
    loaded = ckpt.load_checkpoint(out, model=_info())
    config = loaded.config
    assert config["model"] == {"name": "synthetic", "fingerprint": "synthetic-1234-2x2x16", "n_layers": 2,
                               "n_kv_heads": 2, "head_dim": 16}
    assert config["policy"]["hidden"] == 8
    assert config["training"]["lr"] == 1e-2 and config["training"]["grad_clip"] == 5.0
    assert config["traces"]["train"]["manifest_hash"] == "synthetic-0-8x64"
    assert config["state"]["step"] == 30 and config["state"]["best_step"] == result.best_step
    # the deployed weights are the best EMA weights
    for name, best in zip(trainer.names, trainer.best):
        torch.testing.assert_close(loaded.policy.state_dict()[name], best)
    assert not any(p.requires_grad for p in loaded.policy.parameters())
    assert len(ckpt.load_history(out)) == 3  # logged every 10 steps


def test_refuses_other_model_other_shape_and_damage(tmp_path):
    out = tmp_path / "ckpt"
    net = PolicyNet(PolicyConfig(**SHAPE, hidden=8, max_position=64))
    config = {"model": {"name": "synthetic", "fingerprint": "abc", "n_layers": 2, "n_kv_heads": 2, "head_dim": 16},
              "policy": net.config.to_dict()}
    ckpt.save_checkpoint(out, config, net.state_dict())
    ckpt.load_checkpoint(out, model=_info("abc"))
    with pytest.warns(ckpt.OtherWeightsWarning, match="fingerprint abc"):  # other weights: warned, loaded
        ckpt.load_checkpoint(out, model=_info("other"))
    with pytest.raises(KVPError, match="KV heads, head dim"):
        ckpt.load_checkpoint(out, model=_info("abc", n_kv_heads=3))
    # the same shape on a hybrid model: its two evicted layers are not the layers the policy learned
    with pytest.raises(KVPError, match=r"slide as none of them .* slide as layers \[0, 2\] \(of 4\)"):
        ckpt.load_checkpoint(out, model=_info("abc", layer_windows=(8, None, 8, None)))
    # network shape in the config differs from the weights
    bad = json.loads((out / ckpt.CONFIG).read_text())
    bad["policy"]["hidden"] = 16
    (out / ckpt.CONFIG).write_text(json.dumps(bad))
    with pytest.raises(KVPError, match="does not match the network shape"):
        ckpt.load_checkpoint(out)
    # damaged weights
    ckpt.save_checkpoint(out, config, net.state_dict())
    data = bytearray((out / ckpt.WEIGHTS).read_bytes())
    data[-10] ^= 0xFF
    (out / ckpt.WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(KVPError, match="does not match the hash"):
        ckpt.load_checkpoint(out)
    with pytest.raises(KVPError, match="not a KVP checkpoint"):
        ckpt.load_checkpoint(tmp_path / "nowhere")


def test_other_weights_are_named_by_their_base_models_hub_id(tmp_path):
    """A policy for the converted smollm2-135m on the Hub's original of it (the same base model) or on another model
    of its shape: both run with a warning saying which."""
    net = PolicyNet(PolicyConfig(**SHAPE, hidden=8, max_position=64))
    ckpt.save_checkpoint(tmp_path / "p", {"model": {"name": "smollm2-135m", "fingerprint": "abc", **SHAPE},
                                          "policy": net.config.to_dict()}, net.state_dict())
    original = _info("hub", name="HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.warns(ckpt.OtherWeightsWarning, match=r"is the same base model \(HuggingFaceTB/SmolLM2-135M-Instruct\) "
                                                      "with other weights"):
        ckpt.load_checkpoint(tmp_path / "p", model=original)
    with pytest.warns(ckpt.OtherWeightsWarning, match=r"is another model \(HuggingFaceTB/SmolLM2-135M, the policy's "
                                                      r"is HuggingFaceTB/SmolLM2-135M-Instruct\)"):
        ckpt.load_checkpoint(tmp_path / "p", model=_info("base", name="HuggingFaceTB/SmolLM2-135M"))
    with pytest.warns(ckpt.OtherWeightsWarning, match="has its cache shape but other weights"):
        ckpt.load_checkpoint(tmp_path / "p", model=_info("local", name="./my-model"))


def test_failed_write_leaves_no_partial_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    net = PolicyNet(PolicyConfig(**SHAPE, hidden=8, max_position=64))
    config = {"model": {"name": "s", "fingerprint": "f", "n_layers": 2, "n_kv_heads": 2, "head_dim": 16},
              "policy": net.config.to_dict()}
    with pytest.raises(AttributeError):  # a str has no .detach()
        ckpt.save_checkpoint(out, config, net.state_dict(), resume={"x": "not a tensor"})
    assert not out.exists() and list(tmp_path.iterdir()) == []
    ckpt.save_checkpoint(out, config, net.state_dict())
    first = (out / ckpt.WEIGHTS).read_bytes()
    with pytest.raises(TypeError):
        ckpt.save_checkpoint(out, config | {"x": object()}, net.state_dict())  # not JSON-able
    assert (out / ckpt.WEIGHTS).read_bytes() == first and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


class _Crash(Exception):
    pass


def test_a_killed_run_resumes_from_its_last_checkpoint_to_the_same_weights(tmp_path):
    straight = _trainer(tmp_path / "straight")
    straight.run()

    crashed = _trainer(tmp_path / "crashed")
    step = crashed.train_step

    def crash_at_25():
        if crashed.step == 25:
            raise _Crash()
        return step()

    crashed.train_step = crash_at_25
    with pytest.raises(_Crash):
        crashed.run()
    assert ckpt.read_config(tmp_path / "crashed")["state"]["step"] == 20  # the last checkpoint

    resumed = _trainer(tmp_path / "crashed")
    assert resumed.step == 20
    result = resumed.run()
    assert result.steps == 30
    for a, b in zip(straight.params, resumed.params):
        torch.testing.assert_close(a, b)
    for a, b in zip(straight.ema, resumed.ema):
        torch.testing.assert_close(a, b)
    assert straight.best_step == resumed.best_step
    assert [h["step"] for h in ckpt.load_history(tmp_path / "crashed")] == [10, 20, 30]


def test_resume_refuses_other_settings(tmp_path):
    _trainer(tmp_path / "c", steps=10).run()
    with pytest.raises(KVPError, match="other settings"):
        _trainer(tmp_path / "c", lr=1e-3)
    longer = _trainer(tmp_path / "c", steps=20)  # more steps is a resumable change
    assert longer.step == 10
    fresh = Trainer(SyntheticTraces(8, length=64, **SHAPE), tmp_path / "c",
                    policy=PolicyConfig(**SHAPE, hidden=8, max_position=64), config=_config(lr=1e-3), resume=False,
                    progress=False)
    assert fresh.step == 0
    with pytest.raises(KVPError, match="another policy"):
        Trainer(SyntheticTraces(8, length=64, **SHAPE), tmp_path / "c",
                policy=PolicyConfig(**SHAPE, hidden=16, max_position=64), config=_config(steps=10), progress=False)


def test_a_run_interrupted_before_its_first_validation_resumes_to_the_same_weights(tmp_path):
    straight = _trainer(tmp_path / "straight", checkpoint_every=2)
    straight.run()

    stopped = _trainer(tmp_path / "stopped", checkpoint_every=2)  # validation first comes at step 10
    step = stopped.train_step

    def ctrl_c_at_5():
        if stopped.step == 5:
            raise KeyboardInterrupt
        return step()

    stopped.train_step = ctrl_c_at_5
    with pytest.raises(KeyboardInterrupt):
        stopped.run()
    state = ckpt.read_config(tmp_path / "stopped")["state"]
    assert state["step"] == 5 and state["best_val_reward"] is None  # saved on the interrupt, no best yet

    resumed = _trainer(tmp_path / "stopped", checkpoint_every=2)
    assert resumed.step == 5
    assert resumed.run().steps == 30
    for a, b in zip(straight.params, resumed.params):
        torch.testing.assert_close(a, b)
    assert straight.best_step == resumed.best_step and straight.best_reward == resumed.best_reward


def test_a_save_killed_between_the_renames_of_a_fallback_swap_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from kvpolicy import io

    out = tmp_path / "ckpt"
    _trainer(out, steps=10).run()
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)  # a file system without renameat2's exchange
    real_replace, calls = io.os.replace, []

    def killed_after_first_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise _Crash()
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", killed_after_first_rename)
    longer = _trainer(out, steps=20)
    with pytest.raises(_Crash):
        longer.run()  # its save at step 20 dies with the old checkpoint parked and the new one not yet in place
    monkeypatch.setattr(io.os, "replace", real_replace)
    assert not out.exists()
    resumed = _trainer(out, steps=20)  # finds the parked checkpoint and puts it back
    assert resumed.step == 10
    resumed.lock.release()  # what its run would do at the end: the lock file beside the checkpoint goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.pop("model"), "'model' is missing"),
    (lambda c: c["policy"].update(hidden="abc"), "'policy.hidden' must be an integer"),
    (lambda c: c["model"].pop("fingerprint"), "'model.fingerprint' is missing"),
    (lambda c: c.update(weights_sha256=5), "'weights_sha256' must be a string"),
])
def test_a_malformed_config_is_refused_naming_the_file_and_field(tmp_path, edit, field):
    out = tmp_path / "ckpt"
    _trainer(out, steps=2, val_every=2, checkpoint_every=2).run()
    config = json.loads((out / ckpt.CONFIG).read_text())
    edit(config)
    (out / ckpt.CONFIG).write_text(json.dumps(config))
    with pytest.raises(KVPError, match=f"config.json: field {field}") as err:
        ckpt.load_checkpoint(out)
    assert "\n" not in str(err.value)


def test_resume_needs_the_training_state(tmp_path):
    out = tmp_path / "ckpt"
    _trainer(out, steps=2, val_every=2, checkpoint_every=2).run()
    config = json.loads((out / ckpt.CONFIG).read_text())
    config["state"].pop("step")
    (out / ckpt.CONFIG).write_text(json.dumps(config))
    ckpt.load_checkpoint(out)  # the policy itself is still usable
    with pytest.raises(KVPError, match="field 'state.step' is missing; pass --restart"):
        _trainer(out, steps=2, val_every=2, checkpoint_every=2)


def test_an_unwritable_checkpoint_directory_is_refused_before_any_step(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(KVPError, match="cannot write checkpoint directory: .*file: a part of the path is not a dir"):
        _trainer(tmp_path / "file" / "ckpt")
    assert not (tmp_path / "file" / "ckpt").exists()


def test_a_signal_in_the_middle_of_a_step_saves_the_state_between_two_whole_steps(tmp_path):
    import signal

    straight = _trainer(tmp_path / "straight")
    straight.run()
    stopped = _trainer(tmp_path / "stopped")
    optimizer_step = stopped.opt.step

    def signal_mid_step(*args, **kwargs):  # after the optimizer's update, before this step's EMA update
        out = optimizer_step(*args, **kwargs)
        if stopped.step == 13:
            signal.raise_signal(signal.SIGTERM)
        return out

    stopped.opt.step = signal_mid_step
    with pytest.raises(KeyboardInterrupt):
        stopped.run()
    assert ckpt.read_config(tmp_path / "stopped")["state"]["step"] == 14  # step 13 completed, then stopped
    resumed = _trainer(tmp_path / "stopped")
    resumed.run()
    for a, b in zip(straight.params + straight.ema, resumed.params + resumed.ema):
        assert torch.equal(a, b)
