"""A loaded model with the facts every later stage needs (layers, heads, fingerprint)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from kvpolicy.errors import KVPError
from kvpolicy.models.placement import dtype_name

# what a trace manifest or a checkpoint records of the model (a checkpoint keeps the cache shape and identity
# only), as a kvpolicy.schema
MODEL_SCHEMA = {"name": str, "fingerprint": str, "n_layers": int, "n_kv_heads": int, "head_dim": int}


def refuse_sliding_window(config: Any, name: str) -> None:
    """Raise KVPError for a decoder config (a transformers PretrainedConfig) with sliding-window or chunked layers:
    kvpolicy evicts from full-attention caches only (every layer one DynamicLayer)."""
    layer_types = getattr(config, "layer_types", None) or []
    windowed = [i for i, kind in enumerate(layer_types) if kind != "full_attention"]
    if windowed or getattr(config, "use_sliding_window", False):
        where = f"layers {windowed}" if windowed else "every layer"
        raise KVPError(
            f"model '{name}' uses sliding-window attention in {where}; kvpolicy evicts only from full-attention "
            "caches: use a model without sliding windows (e.g. smollm2-135m, qwen2.5-0.5b)"
        )


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
    """Shape facts of a decoder model's KV cache, plus a fingerprint that traces and checkpoints record."""

    name: str
    family: str
    n_layers: int
    n_kv_heads: int
    n_query_heads: int
    head_dim: int
    max_positions: int
    fingerprint: str

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group)."""
        return self.n_query_heads // self.n_kv_heads

    @property
    def n_agents(self) -> int:
        """One eviction agent per (layer, KV head)."""
        return self.n_layers * self.n_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        """Render messages [{"role", "content"}] with the model's own chat template."""
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
