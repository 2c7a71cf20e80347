"""`kvp generate`: streams the answer, then the cache size before and after (or one JSON record); reads the prompt
from an argument, stdin or a file; samples reproducibly; cuts at stop strings; bad input is one clear line."""

from __future__ import annotations

import io
import json

import pytest

from kvpolicy.cli import main

QUICK = ["generate", "--budget", "32", "--max-new-tokens", "6"]
PROMPT = "Name three colors."


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


def test_generate_says_what_a_chunked_prefill_and_bounded_decoding_held(smollm, capsys):
    prompt = "The capital of France is Paris. The capital of Italy is Rome. " * 12
    assert main(["generate", "--budget", "32", "--prefill-chunk", "64", "--bounded-every", "8", "--max-new-tokens", "3",
                 "--question", " What is the capital of Italy?", prompt]) == 0
    out = capsys.readouterr().out
    assert "prefill in chunks of 64 tokens, cut after each: at most" in out
    held = int(out.split("cut after each: at most ")[1].split()[0])
    assert held <= 32 + 64
    assert "while decoding: at most 40 entries per KV head, cut back to 32 every 8 tokens" in out


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
        (["--budget", "32", "--temperature", "-1", "x"], "temperature must be a number >= 0"),
        (["--budget", "32", "--top-p", "0", "x"], "top_p must be in (0, 1]"),
        (["--budget", "32", "--stop", "", "x"], "stop string must be non-empty"),
        (["--budget", "32"], "no prompt: give it as an argument, - to read it from stdin, or --prompt-file"),
        (["--budget", "32", "--prompt-file", "/nonexistent/prompt.txt"], "does not exist"),
        (["--budget", "32", "--device", "tpu", "x"], "unknown device 'tpu'"),
        (["--budget", "32", "--prefill-chunk", "8", "x"], "use --prefill-chunk 20 or more"),
        (["--budget", "32", "--scorer", "kvzip", "--prefill-chunk", "64", "x"], "cannot re-rank a cache cut chunk"),
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


def test_a_model_without_a_bundled_policy_is_told_how_to_train_one(tmp_path, monkeypatch, capsys):
    """`--scorer kvp` (or load_policy(model=...)) on a model directory, or that directory named as the policy: what
    to run, in one line, before the model is loaded."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from kvpolicy.compression.scorers.learned import load_policy
    from kvpolicy.errors import KVPError

    monkeypatch.setenv("KVP_CACHE_DIR", str(tmp_path / "cache"))  # where identify() remembers file hashes
    model = tmp_path / "model"
    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(model)
    capsys.readouterr()  # transformers' own bar while it saved
    how = f"train one with `kvp fit --model {model} --out DIR` (or kvp traces + kvp train), then use kvp:DIR"
    for scorer, said in [("kvp", f"no bundled policy for this model ('{model}'; bundled for: "),
                         (f"kvp:{model}", f"{model} is not a KVP checkpoint but a model directory: ")]:
        assert main([*QUICK, "--model", str(model), "--scorer", scorer, PROMPT]) == 1
        err = capsys.readouterr().err.strip()
        assert said in err and err.endswith(how) and len(err.splitlines()) == 1, err
    with pytest.raises(KVPError) as refused:
        load_policy(model=AutoModelForCausalLM.from_pretrained(model))
    assert str(refused.value).startswith(f"no bundled policy for this model ('{model}'") and how in str(refused.value)


@pytest.mark.model
def test_a_policy_for_another_model_is_refused_before_any_work(smollm, tmp_path, capsys, monkeypatch):
    from kvpolicy.compression import engine
    from kvpolicy.policy import checkpoint as ckpt
    from kvpolicy.policy.network import PolicyConfig, PolicyNet

    info = smollm.info
    net = PolicyNet(PolicyConfig(info.n_layers, info.n_kv_heads, info.head_dim // 2, hidden=4))
    model = {"name": "other", "fingerprint": "0123456789abcdef", "n_layers": info.n_layers,
             "n_kv_heads": info.n_kv_heads, "head_dim": info.head_dim // 2}
    ckpt.save_checkpoint(tmp_path / "ckpt", {"model": model, "policy": net.config.to_dict()}, net.state_dict())
    monkeypatch.setattr(engine, "prefill", lambda *a, **k: pytest.fail("prefilled before refusing the policy"))
    assert main(["generate", "--budget", "32", "--scorer", f"kvp:{tmp_path / 'ckpt'}", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert "was trained for other, whose cache has" in err and len(err.splitlines()) == 1


def test_generate_prompt_sources_are_checked(tmp_path, monkeypatch, capsys):
    empty, latin = tmp_path / "empty.txt", tmp_path / "latin1.txt"
    empty.write_text(" \n")
    latin.write_bytes("caf\xe9".encode("latin-1"))
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    for argv, message in [
        (["--prompt-file", str(empty)], "the prompt is empty"),
        (["--prompt-file", str(latin)], "is not UTF-8 text"),
        (["--prompt-file", str(empty), "x"], "either as an argument or with --prompt-file, not both"),
        (["-"], "the prompt is empty"),
    ]:
        assert main(["generate", "--budget", "32", *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def greedy(smollm):
    """What `kvp generate` answers to PROMPT with QUICK's settings, from the library."""
    from kvpolicy.compression.budget import Budget
    from kvpolicy.compression.engine import generate
    from kvpolicy.compression.scorers import make_scorer

    return generate(smollm, PROMPT, "", make_scorer("knorm"), Budget(tokens=32), max_new_tokens=6)


def _json(argv: list[str], capsys) -> dict:
    assert main([*QUICK, "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)  # the whole of stdout is one JSON object


@pytest.mark.model
def test_generate_json_has_the_whole_record_and_reads_stdin_or_a_file(greedy, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT))
    record = _json(["-"], capsys)
    assert record["text"] == greedy.text and record["token_ids"] == greedy.token_ids and len(greedy.token_ids) == 6
    assert record["model"] == "smollm2-135m" and record["scorer"]["name"] == "knorm" and record["budget"] == "b32"
    assert record["protocol"] == "query-aware" and record["stop_reason"] == "max_new_tokens"
    assert record["prompt_tokens"] == record["context_tokens"] + record["question_tokens"] > 0
    assert record["cache_tokens_full"] == record["prompt_tokens"] and record["cache_bytes_compressed"] > 0
    assert record["sampling"] == {"temperature": 0.0, "top_p": 1.0, "seed": None}
    assert set(record["timings"]) == {"prefill_s", "compress_s", "decode_s", "decode_tokens_per_s"}
    assert record["timings"]["decode_tokens_per_s"] > 0
    path = tmp_path / "prompt.txt"
    path.write_text(PROMPT, encoding="utf-8")
    assert _json(["--prompt-file", str(path)], capsys)["token_ids"] == greedy.token_ids


@pytest.fixture(scope="module")
def stop(smollm, greedy) -> str:
    """A stop string that spans the answer's third and fourth tokens."""
    text = smollm.decode(greedy.token_ids[2:4])
    assert not any(text in smollm.decode([token]) for token in greedy.token_ids)
    return text


@pytest.mark.model
def test_a_stop_string_ends_decoding_at_the_token_that_completes_it(smollm, greedy, stop, capsys):
    ids = greedy.token_ids
    completed = next(k for k in range(1, len(ids) + 1) if stop in smollm.decode(ids[:k]))
    record = _json(["--stop", stop, "--stop", "never seen", PROMPT], capsys)
    assert record["stop_reason"] == "stop_string" and record["token_ids"] == ids[:completed] != ids
    assert record["text"] == greedy.text[: greedy.text.find(stop)]


@pytest.mark.model
def test_generate_streams_the_answer_while_it_is_made(greedy, stop, capsys, monkeypatch):
    """Streamed with a stop string: what is printed is the answer cut before it, and it is out before the end."""
    from kvpolicy.compression import engine

    during = []
    original = engine.generate

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        during.append(capsys.readouterr().out)  # what was printed before generate returned
        return result

    monkeypatch.setattr(engine, "generate", spy)
    assert main([*QUICK, "--stop", stop, PROMPT]) == 0
    out = during[0] + capsys.readouterr().out
    answer = greedy.text[: greedy.text.find(stop)]
    assert during[0] and answer.startswith(during[0])
    assert out.split("\n\nscorer ")[0] == answer
    decode = next(line for line in out.splitlines() if line.startswith("decode:"))
    assert " tokens in " in decode and "tokens/s), stopped by stop_string" in decode


@pytest.mark.model
def test_sampling_with_a_seed_is_reproducible_and_not_greedy(greedy, capsys):
    hot = ["--max-new-tokens", "3", "--temperature", "5", "--top-p", "0.9", "--seed", "3", PROMPT]
    first = _json(hot, capsys)
    assert first["sampling"] == {"temperature": 5.0, "top_p": 0.9, "seed": 3}
    assert first["token_ids"] == _json(hot, capsys)["token_ids"] != greedy.token_ids[:3]
