"""KVzap's training data: per prompt, the hidden states that enter every layer's attention (the inputs) and the log
KVzip+ scores of the same tokens (the targets), for a seeded sample of its tokens; cached one file per prompt.

NVIDIA's recipe (kvzap/data.py in NVIDIA/kvpress) scores Nemotron texts of 750-1250 tokens by one forward of the chat
[user: text + "Repeat the previous context exactly.", assistant: text], reading the attention of the repeated text
on the original. Ours scores the prompts KVP trains on (`kvp traces`' sources, so both see the same texts and the same
held-out split, chat-rendered where the source is a chat) with the `kvzip_plus` scorer: kvpress's own KVzipPress
reconstruction of the cached prompt (in chunks of 2048 tokens, on top of the cache) with KVzip+'s normalization. The
score is the same: the max, over the reconstruction's queries and the KV head's group, of attention / ||h_query|| x
||W_O v||, on the prompts KVP sees at their lengths (0.5x to 2x --context for the mix). Left out of the sample: the
chat template's prefix, which kvpress does not reconstruct (its scores stay 0; NVIDIA samples the text alone too),
and the first n_sink tokens, to which kvpress gives the top score.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from kvpolicy.compression.engine import prefill, rank
from kvpolicy.compression.scorers.base import ALL_QUERIES
from kvpolicy.compression.scorers.kvzip import KVzipPlusScorer
from kvpolicy.errors import KVPError
from kvpolicy.io import atomic_path, write_durably
from kvpolicy.kvzap.config import KVzapRunConfig
from kvpolicy.models import ModelHandle
from kvpolicy.progress import bar
from kvpolicy.traces.sources import trace_prompts

LOG_FLOOR = 1e-10  # scores are clamped here before the log (SmolLM2's smallest KVzip+ scores at 2K are ~1e-6)


def token_generator(seed: int, split: str, index: int) -> torch.Generator:
    """The generator that samples prompt `index` of `split`'s tokens: the same whatever order prompts are collected
    in (a resumed run draws what an uninterrupted one would)."""
    digest = hashlib.sha256(f"kvzap|{seed}|{split}|{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def sample_prompt(handle: ModelHandle, ids: torch.Tensor, scorer: KVzipPlusScorer, n_tokens: int,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Inputs and targets of `n_tokens` tokens of ids (1, T), drawn by `generator` among those the reconstruction
    scores (all of them when fewer), in position order:
    inputs (n, L, hidden) fp16: attention inputs (after the input layernorm); targets (n, L, H) fp32: log KVzip+
    scores; positions (n,) int64."""
    state, _ = prefill(handle, ids, record_queries=ALL_QUERIES)
    scores = torch.stack(rank(handle, state, scorer))[:, 0].float().cpu()  # (L, H, T)
    scored = (scores > 0).all(dim=1).all(dim=0)
    scored[: scorer.n_sink] = False
    candidates = scored.nonzero().squeeze(1)
    positions = candidates[torch.randperm(len(candidates), generator=generator)[:n_tokens]].sort().values
    picked = positions.to(state.recorded[0].hidden_states.device)
    inputs = torch.stack([r.hidden_states[0, picked].cpu() for r in state.recorded], dim=1)
    targets = scores[:, :, positions].clamp_min(LOG_FLOOR).log().permute(2, 0, 1)
    return {"inputs": inputs.to(torch.float16), "targets": targets.contiguous(), "positions": positions}


def prompt_file(directory: Path, index: int) -> Path:
    return directory / f"{index:05d}.safetensors"


def collect_split(handle: ModelHandle, cfg: KVzapRunConfig, split: str, n: int, directory: Path) -> int:
    """Collect prompts 0..n-1 of `split` into `directory`, one file each, written atomically; prompts already there
    are skipped. Returns how many were collected now."""
    todo = [i for i in range(n) if not prompt_file(directory, i).exists()]
    if not todo:
        return 0
    directory.mkdir(parents=True, exist_ok=True)
    scorer = KVzipPlusScorer()
    prompts = trace_prompts(handle, cfg.source, split, n, cfg.context_tokens, cfg.seed, indices=todo)
    with bar(total=len(todo), desc=f"kvzap data ({split})", unit="prompt") as progress:
        for prompt in prompts:
            ids = handle.encode(prompt.prompt)
            tensors = sample_prompt(handle, ids, scorer, cfg.tokens_per_prompt,
                                    token_generator(cfg.seed, split, prompt.index))
            with atomic_path(prompt_file(directory, prompt.index)) as tmp:
                write_durably(tmp, save(tensors, metadata={"id": prompt.id, "tokens": str(ids.shape[1])}))
            progress.update(1)
    return len(todo)


def load_split(directory: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (N, L, hidden) fp16, targets (N, L, H) fp32) of prompts 0..n-1 collected in `directory`."""
    inputs, targets = [], []
    for index in range(n):
        file = prompt_file(directory, index)
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError) as err:
            raise KVPError(f"{file} is unreadable ({str(err).splitlines()[0]}); delete it and re-run the same "
                           "command to collect it again") from None
        inputs.append(tensors["inputs"])
        targets.append(tensors["targets"])
    return torch.cat(inputs), torch.cat(targets)
