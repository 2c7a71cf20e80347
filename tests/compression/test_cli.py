"""`kvp generate`: prints the answer and the cache size before and after; bad input is one clear line."""

from __future__ import annotations

import pytest

from kvpolicy.cli import main


@pytest.mark.model
def test_generate_prints_answer_and_cache_sizes(smollm, capsys):
    prompt = "The capital of France is Paris. The capital of Italy is Rome. " * 6
    question = " What is the capital of Italy?"
    code = main(["generate", "--budget", "32", "--max-new-tokens", "3", "--question", question, prompt])
    out = capsys.readouterr().out
    assert code == 0
    before = next(line for line in out.splitlines() if line.startswith("cache before:"))
    after = next(line for line in out.splitlines() if line.startswith("cache after:"))
    assert "32 entries per KV head" in after and "bytes" in after
    full = int(before.split(":")[1].split()[0])
    full_bytes = int(before.split(", ")[1].split()[0].replace(",", ""))
    assert full > 32 and int(after.split(", ")[1].split()[0].replace(",", "")) * full == full_bytes * 32
    assert out.split("\n")[0].strip()  # the answer comes first


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--budget", "0", "x"], "positive number of tokens"),
        (["--budget", "32", "--scorer", "nope", "x"], "unknown scorer 'nope'"),
        (["--ratio", "1.5", "x"], "fraction of entries removed"),
        (["--budget", "32", "--scorer", "snapkv", "--bounded-every", "4", "x"], "attention-free"),
        (["--budget", "16", "x"], "cannot keep the 4 sinks and 16 recent positions it promises"),
        (["--budget", "32", "--sinks", "8", "--recent", "30", "x"], "use a budget >= 38"),
        (["--budget", "32", "--max-new-tokens", "-1", "x"], "--max-new-tokens must be >= 0"),
        (["--budget", "32", " \n "], "the prompt is empty"),
    ],
)
def test_generate_bad_input_is_one_clear_line(argv, message, capsys):
    assert main(["generate", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_generate_budget_must_be_an_integer(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--budget", "2.5", "x"])
    assert exit_.value.code == 2  # a usage error, as argparse says it
    assert "invalid int value: '2.5'" in capsys.readouterr().err


@pytest.mark.model
def test_a_policy_for_another_model_is_refused_before_any_work(smollm, tmp_path, capsys, monkeypatch):
    from kvpolicy.compression import engine
    from kvpolicy.policy import checkpoint as ckpt
    from kvpolicy.policy.network import PolicyConfig, PolicyNet

    info = smollm.info
    net = PolicyNet(PolicyConfig(info.n_layers, info.n_kv_heads, info.head_dim, hidden=4))
    model = {"name": "other", "fingerprint": "0123456789abcdef", "n_layers": info.n_layers,
             "n_kv_heads": info.n_kv_heads, "head_dim": info.head_dim}
    ckpt.save_checkpoint(tmp_path / "ckpt", {"model": model, "policy": net.config.to_dict()}, net.state_dict())
    monkeypatch.setattr(engine, "prefill", lambda *a, **k: pytest.fail("prefilled before refusing the policy"))
    assert main(["generate", "--budget", "32", "--scorer", f"kvp:{tmp_path / 'ckpt'}", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert "was trained for other (fingerprint 0123456789abcdef)" in err and len(err.splitlines()) == 1
