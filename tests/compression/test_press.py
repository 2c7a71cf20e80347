"""KVPolicyPress: our scorers inside kvpress, through its forward hook and its text-generation pipeline."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache, pipeline

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import compress, generate, prefill
from kvpolicy.compression.press import KVPolicyPress
from kvpolicy.compression.scorers import ALL_QUERIES, make_scorer
from kvpolicy.compression.scorers.base import Scorer
from kvpolicy.data.essays import load_essays
from kvpolicy.errors import KVPError


def test_press_needs_a_scorer():
    with pytest.raises(KVPError, match="scorer"):
        KVPolicyPress(compression_ratio=0.5)


def test_plain_kvp_scores_only_once_applied_to_a_model():
    """"kvp" is the policy bundled for the model the press is applied to: scored before that, it says so."""
    from transformers import LlamaConfig, LlamaForCausalLM

    press = KVPolicyPress(compression_ratio=0.5, scorer="kvp")
    keys = torch.zeros(1, 1, 8, 4)
    for use in (press.score, press.compress):
        with pytest.raises(KVPError, match="not applied to one"):
            use(None, None, keys, keys, None, {})
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(KVPError, match="no bundled"), press(tiny):  # a model without a bundled policy
        pass


@pytest.mark.model
def test_plain_kvp_is_the_policy_bundled_for_the_model_the_press_is_applied_to(smollm):
    prompt = smollm.encode(load_essays()[6].text)[:, :200]
    press = KVPolicyPress(compression_ratio=0.5, scorer="kvp")
    cache = DynamicCache()
    with torch.no_grad(), press(smollm.model):
        smollm.model.model(input_ids=prompt, past_key_values=cache)
    assert press.scorer.identity() == make_scorer("kvp:smollm2-135m").identity()  # as `kvp generate --scorer kvp`
    assert press.scorer.identity() == make_scorer("kvp", model=smollm.info).identity()
    assert cache.layers[0].keys.shape[-2] == Budget(ratio=0.5).kept(200)


def test_the_press_brings_kvpress_pipeline_with_it():
    """In a fresh interpreter, using kvp.KVPolicyPress registers kvpress's pipeline: no `import kvpress` needed."""
    code = """
import sys
import kvpolicy as kvp

assert "kvpress" not in sys.modules
press = kvp.KVPolicyPress(compression_ratio=0.5, scorer="knorm")
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, pipeline

words = ["<unk>", "<s>", "</s>", *"the cat sat on a mat what did".split()]
backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
backend.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
torch.manual_seed(0)  # an untrained model: unseeded, its first token is sometimes the end of the text
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
answer = pipe("the cat sat on a mat " * 8, question=" what did the cat", press=press, max_new_tokens=3)["answer"]
print(type(answer).__name__, len(answer))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    kind, length = run.stdout.split()[-2:]
    assert kind == "str" and int(length) > 0


@pytest.mark.model
@pytest.mark.parametrize("name", ["knorm", "snapkv"])
def test_press_keeps_what_the_engine_keeps(smollm, name):
    prompt = smollm.encode(load_essays()[6].text)[:, :300]
    full, _ = prefill(smollm, prompt, record_queries=ALL_QUERIES)
    ours = compress(smollm, full, make_scorer(name), Budget(ratio=0.7))  # default sinks 4, recent 16 on both sides
    cache = DynamicCache()
    with torch.no_grad(), KVPolicyPress(compression_ratio=0.7, scorer=make_scorer(name))(smollm.model):
        smollm.model.model(input_ids=prompt, past_key_values=cache)
    for idx, layer in enumerate(cache.layers):
        theirs = torch.cdist(layer.keys, full.layer(idx)[0]).argmin(dim=-1).sort(dim=-1).values
        assert torch.equal(ours.positions[idx], theirs), f"layer {idx}"
        assert set(range(4)) | set(range(284, 300)) <= set(theirs[0, 0].tolist())


@pytest.mark.model
@pytest.mark.parametrize("name", ["knorm", "snapkv"])
def test_press_in_kvpress_pipeline_answers_like_the_engine(smollm, name):
    context = load_essays()[7].text[:700]
    question = " What is the main point of this text?"
    pipe = pipeline("kv-press-text-generation", model=smollm.model, tokenizer=smollm.tokenizer, device="cpu")
    press = KVPolicyPress(compression_ratio=0.5, scorer=make_scorer(name))
    answer = pipe(context, question=question, press=press, max_new_tokens=6)["answer"]
    ours = generate(smollm, context, question, make_scorer(name), Budget(ratio=0.5), "question-agnostic", 6)
    assert answer and answer == ours.text
    assert ours.cache_tokens_compressed == Budget(ratio=0.5).kept(ours.context_tokens)


@dataclass
class EverySeventh(Scorer):
    """Prefers entries whose TRUE position is a multiple of 7 (the latest first): a choice that only a press which
    knows true positions after earlier cuts can make."""

    name = "every-seventh"

    def score(self, view):
        return (view.positions % 7 == 0).float() * 1e4 + view.positions.float()


@pytest.mark.model
def test_decoding_presses_score_true_positions(smollm):
    """kvpress's PrefillDecodingPress: our press cuts the context at prefill, a second one of ours cuts again every
    4 decoding steps. The second sees true positions (not 0..T-1 of the cut cache): it keeps sinks, recent tokens and
    multiples of 7, and every kept context entry is the context's own key at that position."""
    from kvpress import DecodingPress, PrefillDecodingPress

    context, question = load_essays()[7].text[:700], " Continue the essay."
    pipe = pipeline("kv-press-text-generation", model=smollm.model, tokenizer=smollm.tokenizer, device="cpu")
    full, _ = prefill(smollm, pipe.preprocess(context, [question], "", 10_000)["context_ids"])  # the pipeline's own
    target = 36  # 4 sinks + 16 recent + 16 others, fewer than the multiples of 7 the prefill cut kept
    press = PrefillDecodingPress(
        prefilling_press=KVPolicyPress(compression_ratio=0.5, scorer=EverySeventh()),
        decoding_press=DecodingPress(base_press=KVPolicyPress(compression_ratio=0.0, scorer=EverySeventh()),
                                     compression_interval=4, target_size=target, hidden_states_buffer_size=0),
    )
    cache = DynamicCache()
    pipe(context, question=question, press=press, max_new_tokens=10, cache=cache)
    record = cache.kvpolicy_positions
    P = full.length
    for idx, positions in record.items():
        kept = positions[0]
        assert kept.shape[-1] == target, "a decoding cut happened"
        newest = int(kept.max())
        for head in kept.tolist():
            assert head == sorted(set(head)) and set(range(4)) <= set(head)
            others = [p for p in head if 4 <= p <= newest - 16]
            assert others and all(p % 7 == 0 for p in others), others
        keys = cache.layers[idx].keys[:, :, :target]
        context_entries = kept < P
        reference = full.layer(idx)[0][0].gather(1, kept.clamp(max=P - 1).unsqueeze(-1).expand(-1, -1, keys.shape[-1]))
        assert torch.allclose(keys[0][context_entries], reference[context_entries], atol=1e-5)


@pytest.mark.model
def test_a_query_scorer_cannot_be_wrapped_for_decoding(smollm):
    from kvpress import DecodingPress

    press = DecodingPress(base_press=KVPolicyPress(compression_ratio=0.0, scorer=make_scorer("snapkv")),
                          compression_interval=2, target_size=24, hidden_states_buffer_size=4)
    pipe = pipeline("kv-press-text-generation", model=smollm.model, tokenizer=smollm.tokenizer, device="cpu")
    with pytest.raises(KVPError, match="attention-free scorer"):
        pipe(load_essays()[7].text[:300], question=" Why?", press=press, max_new_tokens=6)
