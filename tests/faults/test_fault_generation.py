"""Fault probe, generation: a generation that would cross the model's position limit is refused in one line before
any forward pass (never cut off half-way, its partial answer lost); every scorer, on a prefill of 1 or 2 tokens,
through the Python API and through `kvp generate`, either works or says in one line what to do, with advice valid
for the entry point that raised it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil

import pytest
import torch

from kvpolicy import cli
from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import compress, generate, prefill, rank
from kvpolicy.compression.names import LEARNED_PREFIX
from kvpolicy.compression.prompts import split_prompt
from kvpolicy.compression.scorers import SCORERS, make_scorer
from kvpolicy.errors import KVPError

pytestmark = pytest.mark.model

ALL_SCORERS = [*SCORERS, f"{LEARNED_PREFIX}smollm2-135m"]  # the registry, and the policy bundled for SmolLM2


@contextlib.contextmanager
def no_forward_pass(model: torch.nn.Module):
    """Within the block, any forward pass through `model` fails the test."""
    hook = model.register_forward_pre_hook(lambda *_: pytest.fail("the model ran a forward pass"))
    try:
        yield
    finally:
        hook.remove()


def test_a_generation_past_the_position_limit_is_refused_before_any_forward_pass(smollm):
    prompt = sum(ids.shape[1] for ids in split_prompt(smollm, "Name a colour.", ""))
    small = dataclasses.replace(smollm, info=dataclasses.replace(smollm.info, max_positions=prompt + 5))
    with no_forward_pass(smollm.model), pytest.raises(KVPError) as refused:
        generate(small, "Name a colour.", "", None, None, max_new_tokens=12)
    message = str(refused.value)
    assert "\n" not in message
    assert f"{prompt} tokens and up to 12 new ones need {prompt + 12} positions, more than the {prompt + 5}" in message
    assert "ask for at most 5 new tokens or shorten the prompt" in message
    with no_forward_pass(smollm.model), pytest.raises(KVPError, match="shorten the prompt"):
        generate(dataclasses.replace(small, info=dataclasses.replace(small.info, max_positions=prompt - 1)),
                 "Name a colour.", "", None, None, max_new_tokens=0)
    answer = generate(small, "Name a colour.", "", None, None, max_new_tokens=5)  # at the limit: fine
    assert 1 <= len(answer.token_ids) <= 5


def test_kvp_generate_past_the_position_limit_streams_nothing_and_is_one_line(smollm, capsys):
    """SmolLM2 has 8192 positions: a short prompt with 9000 new tokens is refused before the prefill."""
    with no_forward_pass(smollm.model):
        code = cli.main(["generate", "Name a colour.", "--budget", "32", "--max-new-tokens", "9000"])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, (code, out, err)
    assert "more than the 8192 of smollm2-135m; ask for at most" in err


def _works_or_one_line(run) -> None:
    """run() returns scores or a state; else it raises a KVPError of one line. Any other exception fails."""
    try:
        result = run()
    except KVPError as err:
        assert "\n" not in str(err)
        return
    for scores in result if isinstance(result, list) else []:
        assert torch.isfinite(scores).all()


def _scorer(name: str):
    if name == "oracle":
        return make_scorer(name, utility=[torch.rand(3, 64) for _ in range(30)])
    return make_scorer(name)


@pytest.mark.parametrize("tokens", [1, 2])
@pytest.mark.parametrize("name", ALL_SCORERS)
def test_every_scorer_on_a_tiny_prefill_works_or_is_one_line_in_python(name, tokens, smollm):
    scorer = _scorer(name)
    ids = smollm.encode("Hello there, how are you doing today?")

    def fresh():
        return prefill(smollm, ids[:, :tokens], record_queries=scorer.query_window)[0]

    def second_chunk():  # a short chunk after a longer one, as in a multi-turn conversation
        state, _ = prefill(smollm, ids[:, :8])
        return prefill(smollm, ids[:, 8:8 + tokens], state, record_queries=scorer.query_window)[0]

    for make in (fresh, second_chunk):
        _works_or_one_line(lambda make=make: rank(smollm, make(), scorer))
        _works_or_one_line(lambda make=make: compress(smollm, make(), scorer, Budget(tokens=1, sinks=0, recent=0)))


def test_a_scorer_window_longer_than_the_prompt_gives_advice_for_every_entry_point(smollm, capsys):
    """SnapKV ranks from the last 65 queries; a templated "hi" has about 30 tokens."""
    assert cli.main(["generate", "hi", "--scorer", "snapkv", "--budget", "20", "--max-new-tokens", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "record_queries" not in err  # a Python argument the CLI does not have
    assert "ranks from the queries of the last 65 tokens" in err and "give at least 65" in err
    scorer = make_scorer("snapkv")
    state, _ = prefill(smollm, smollm.encode("hi"), record_queries=scorer.query_window)
    with pytest.raises(KVPError, match="that chunk .* has only 1 tokens; give at least 65"):
        rank(smollm, state, scorer)


@pytest.fixture(scope="module")
def template_free_model(smollm, tmp_path_factory) -> str:
    """SmolLM2 as a Hugging Face directory without a chat template: its prompt is BOS + context, so
    `--protocol question-agnostic` prefills and compresses exactly 1 (no context) or 2 (context "a") tokens."""
    from kvpolicy.models.loader import cache_root

    root = tmp_path_factory.mktemp("plain")
    directory = root / "smollm2-plain"
    directory.mkdir()
    converted = cache_root() / "smollm2-135m"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(converted / name, directory / name)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").symlink_to(converted / "model.safetensors")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVP_CACHE_DIR", str(root / "cache"))  # its fingerprint memo, not the shared one
        yield str(directory)


@pytest.mark.parametrize("tokens", [1, 2])
@pytest.mark.parametrize("name", [n for n in ALL_SCORERS if not n.startswith(LEARNED_PREFIX)] + ["kvp"])
def test_every_scorer_on_a_tiny_prefill_works_or_is_one_line_in_kvp_generate(name, tokens, template_free_model,
                                                                              capsys):
    from kvpolicy.models import load_model

    handle = load_model(template_free_model)
    context = "a" if tokens == 2 else ""
    assert handle.tokenizer.chat_template is None
    assert split_prompt(handle, context, "Hi")[0].shape[1] == tokens
    code = cli.main(["generate", context, "--question", "Hi", "--model", template_free_model, "--scorer", name,
                     "--protocol", "question-agnostic", "--ratio", "0.5", "--max-new-tokens", "1", "--json"])
    out, err = capsys.readouterr()
    if code == 0:
        assert json.loads(out)["context_tokens"] == tokens
    else:
        assert code == 1 and len(err.strip().splitlines()) == 1, (code, err)
        assert "record_queries" not in err and "make_scorer" not in err  # Python-only advice
