"""A loaded model with the facts every later stage needs (layers, heads, fingerprint)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from kvpolicy.errors import KVPError
from kvpolicy.models.placement import dtype_name

# what a trace manifest or a checkpoint records of the model (a checkpoint keeps the cache shape and identity
# only), as a kvpolicy.schema
MODEL_SCHEMA = {"name": str, "fingerprint": str, "n_layers": int, "n_kv_heads": int, "head_dim": int}


PLAIN_TURN_END = "\n"  # ends each turn of a plain-text prompt (`ModelHandle.chat` for a model without chat template)
EVICTED, SLIDING = "full_attention", "sliding_attention"  # the attention kinds of a decoder layer kvpolicy knows


def layer_windows(config: Any, name: str) -> tuple[int | None, ...]:
    """Each decoder layer's sliding window, None for a full-attention layer (empty when no layer slides), from a
    decoder config (a transformers PretrainedConfig); kvpolicy evicts from the full-attention layers and leaves each
    sliding layer's window as it is (a hybrid model such as Gemma 3). Refused (KVPError): a layer of another kind (e.g.
    chunked attention), and a model whose every layer slides (nothing to evict: its cache is already bounded by the
    window)."""
    window = getattr(config, "sliding_window", None)
    if window is not None and window >= getattr(config, "max_position_embeddings", window + 1):
        window = None  # a window as long as the model's positions never slides (e.g. Phi-3 128K)
    kinds = list(getattr(config, "layer_types", None) or [])
    if not kinds:  # a config without layer kinds slides in every layer, or in none
        sliding = window is not None and getattr(config, "use_sliding_window", True)
        kinds = [SLIDING if sliding else EVICTED] * config.num_hidden_layers
    unknown = sorted({kind for kind in kinds if kind not in (EVICTED, SLIDING)})
    if unknown:
        raise KVPError(f"model '{name}' has {', '.join(unknown)} layers, an attention kind kvpolicy cannot evict from; "
                       "it evicts from full-attention layers and keeps sliding windows as they are")
    if EVICTED not in kinds:
        raise KVPError(f"model '{name}' uses sliding-window attention in every layer: its cache is already bounded by "
                       "the window and has no full-attention layer to evict from")
    windows = tuple(window if kind == SLIDING else None for kind in kinds)
    return windows if any(w is not None for w in windows) else ()


def full_attention_layers(windows: Sequence[int | None]) -> list[int]:
    """The layers of `windows` (one per decoder layer, as `layer_windows` gives them) that attend to the whole cache:
    the ones kvpolicy evicts from, which a policy numbers 0, 1, ... in this order."""
    return [i for i, window in enumerate(windows) if window is None]


@dataclass(frozen=True)
class ModelIdentity:
    """The model a trace set or a checkpoint was made from, as they record it (MODEL_SCHEMA): name, fingerprint
    and KV-cache shape. The other `ModelInfo` facts describe a loaded model and are not needed to read either."""

    name: str
    fingerprint: str
    n_layers: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def from_dict(cls, model: dict[str, Any]) -> ModelIdentity:
        """From a manifest's or checkpoint's "model" section (further fields, e.g. a ModelInfo's, are ignored)."""
        return cls(**{f.name: model[f.name] for f in fields(cls)})

    @property
    def n_agents(self) -> int:
        """One eviction agent per (layer, KV head)."""
        return self.n_layers * self.n_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelInfo:
    """Shape facts of a decoder model's KV cache, plus a fingerprint that traces and checkpoints record.

    n_layers: the layers kvpolicy evicts from (all of them, or a hybrid model's full-attention ones); layer_windows:
    every decoder layer's sliding window, None where it attends to the whole cache (empty: no layer slides)."""

    name: str
    family: str
    n_layers: int
    n_kv_heads: int
    n_query_heads: int
    head_dim: int
    max_positions: int
    fingerprint: str
    layer_windows: tuple[int | None, ...] = ()

    @property
    def evicted_layers(self) -> list[int]:
        """The decoder layers kvpolicy evicts from, in order: the full-attention ones (`layer_windows` None), every
        layer of a model without sliding windows. `n_layers` counts these: a policy has agents for them only."""
        return full_attention_layers(self.layer_windows) if self.layer_windows else list(range(self.n_layers))

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group)."""
        return self.n_query_heads // self.n_kv_heads

    @property
    def n_agents(self) -> int:
        """One eviction agent per (layer, KV head)."""
        return self.n_layers * self.n_kv_heads

    def to_dict(self) -> dict[str, Any]:
        """As JSON holds it: layer_windows a list, and left out when no layer slides (as written before it existed)."""
        facts = asdict(self)
        windows = facts.pop("layer_windows")
        return facts | ({"layer_windows": list(windows)} if windows else {})


@dataclass
class ModelHandle:
    """A causal LM, its tokenizer and its `ModelInfo`."""

    info: ModelInfo
    model: Any  # transformers PreTrainedModel
    tokenizer: Any

    @property
    def dtype_name(self) -> str:
        """The dtype the model runs in, by name ("float32", "bfloat16")."""
        return dtype_name(self.model.dtype)

    @property
    def layers(self) -> list[torch.nn.Module]:
        """The decoder layers (each has `.self_attn`)."""
        return list(self.model.model.layers)

    def chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render messages [{"role", "content"}] with the model's own chat template. A base model without one (Gemma 3
        270M) is prompted with plain text, as lm-eval-harness prompts one: its BOS, then every message's content on its
        own line, and the model continues after the last (nothing marks a generation prompt)."""
        if self.tokenizer.chat_template is None:
            return (self.tokenizer.bos_token or "") + "".join(m["content"] + PLAIN_TURN_END for m in messages)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids (1, T) without adding special tokens (chat templates carry their own)."""
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        return ids

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def eos_token_ids(self) -> set[int]:
        """Token ids that end an assistant turn."""
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None)
        if isinstance(extra, int):
            ids.add(extra)
        elif extra:
            ids.update(extra)
        for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid is not None:
                ids.add(tid)
        return {i for i in ids if i is not None}
