"""KVzip: rank each cached entry by the attention it gets while the model reconstructs the cached text.

Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction" (arXiv 2505.23416). After the
prefill the model reads "Repeat the previous context exactly." in the chat template's assistant turn, then the cached
text again, on top of the cache (in chunks of `chunk_size` tokens); an entry's score is the largest attention any
query of its KV head's group gives it meanwhile. KVzip+ divides each query's row by the norm of its hidden state and
multiplies each entry's column by the norm of its value through W_O. The reconstruction costs 2-3 prefills and needs
the cached text, so it ranks only an uncut prefill of one sequence (`KVState.ids`), never while decoding. Its
budget is spread as kvpress spreads it: over every layer and head at once (compression/allocation.py, `Global`).

The scores are kvpress's own: `rank_cache` drives `KVzipPress` on a branch of the state through kvpress 0.5.5's
private steps (the attributes its `__call__` sets, then `_perform_kvzip_compression`, which at compression ratio 0
only scores), as kvpress exposes no scoring call; tests/compression/test_kvzip.py pins them against kvpress's own
end-to-end KVzip, so a kvpress release that changes them fails there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from kvpress import KVzipPress

from kvpolicy.compression.allocation import AdaKV, Allocation, Global
from kvpolicy.compression.scorers.base import Scorer
from kvpolicy.compression.scorers.kvpress_backed import rotary_attached
from kvpolicy.compression.state import KVState
from kvpolicy.errors import KVPError
from kvpolicy.models import ModelHandle, ModelInfo

UNSUPPORTED_FAMILIES = ("gemma3", "gemma3_text")  # kvpress's KVzipPress refuses Gemma 3


def template_split(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix_ids (1, P), suffix_ids (1, S)): the chat template's text before a user turn's content and after it up
    to the assistant's answer, found as kvpress's KVzipPress finds them (a dummy turn rendered and split); without a
    template, no prefix and the suffix "\\n"."""
    if tokenizer.chat_template is None:
        prefix, suffix = "", "\n"
    else:
        dummy = "dummy context"
        separator = "\n" + "#" * len(dummy)
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": dummy + separator}],
                                                 add_generation_prompt=True, tokenize=False, enable_thinking=False)
        parts = rendered.split(separator)
        if len(parts) != 2:
            raise KVPError("the model's chat template does not render a user turn's text as it is, so KVzip cannot "
                           "find where the cached text starts; use another scorer")
        prefix, suffix = parts[0].split(dummy)[0], parts[1]
    return (tokenizer.encode(prefix, return_tensors="pt", add_special_tokens=False),
            tokenizer.encode(suffix, return_tensors="pt", add_special_tokens=False))


@dataclass
class KVzipScorer(Scorer):
    """KVzip's scores through kvpress's KVzipPress. n_sink: the first entries, given the top score (as kvpress's
    `compress_post` does); chunk_size: cached tokens reconstructed per pass; kvzip_plus: KVzip+'s normalization;
    layerwise: as kvpress's option, False (its default): the budget of the whole model goes to its best scores
    whichever layer and head they are in; True: each layer's budget to its best scores, whichever head."""

    name = "kvzip"
    reads_text = True
    whole_prefill = True
    n_sink: int = 4
    chunk_size: int = 2048
    kvzip_plus: bool = False
    layerwise: bool = False

    @property
    def allocation(self) -> Allocation:
        return AdaKV(alpha_safeguard=0.0) if self.layerwise else Global()

    def __post_init__(self):
        self._press = self.make_press()

    def make_press(self) -> KVzipPress:
        return KVzipPress(compression_ratio=0.0, kvzip_plus_normalization=self.kvzip_plus, n_sink=self.n_sink,
                          chunk_size=self.chunk_size)

    def check_model(self, info: ModelInfo) -> None:
        if info.family in UNSUPPORTED_FAMILIES:
            raise KVPError(f"scorer '{self.name}' runs kvpress's KVzip, which does not support Gemma 3 "
                           f"({info.name}); use another scorer or model")

    def rank_cache(self, handle: ModelHandle, state: KVState) -> list[torch.Tensor]:
        """Per layer (1, H, T) float32 scores of the uncut cache of `state` (one sequence), from a reconstruction on a
        branch of it: the caller's cache is never extended."""
        press, model, ids = self._press, handle.model, state.ids
        prefix_ids, suffix_ids = template_split(handle.tokenizer)
        # the template's prefix is not reconstructed, as in kvpress; a cache that does not start with it (plain text)
        # is reconstructed whole, where kvpress would leave out as many of its first tokens
        prefix = prefix_ids.shape[1]
        starts_with_prefix = ids.shape[1] > prefix and torch.equal(ids[0, :prefix].cpu(), prefix_ids[0])
        try:  # what KVzipPress.__call__ sets around the prefill, then its scoring
            press.prefix_length = prefix if starts_with_prefix else 0
            press._suffix_ids, press._context_ids, press._cache = suffix_ids, ids, state.branch().cache
            press.post_init_from_model(model)
            with contextlib.ExitStack() as attached:
                for layer in handle.layers:  # kvpress attaches rotary_emb for good; here only while it scores
                    attached.enter_context(rotary_attached(layer.self_attn, model.model.rotary_emb))
                press._perform_kvzip_compression(model, handle.tokenizer)
            scores = press.score_val  # (L, 1, H, T), model dtype
            scores[..., : self.n_sink] = scores.amax() + 1.0
            return list(scores.float().unbind(0))
        finally:
            press._reset_internal_parameters()


@dataclass
class KVzipPlusScorer(KVzipScorer):
    """KVzip+: KVzip with its normalization by the hidden-state and W_O·value norms."""

    name = "kvzip_plus"
    kvzip_plus: bool = True
