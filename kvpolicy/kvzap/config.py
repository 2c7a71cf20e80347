"""`kvp train-kvzap`'s settings as plain values (no torch), so its help never imports the model or kvpress."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from kvpolicy.errors import KVPError
from kvpolicy.policy.config import KVZAP_KINDS as KINDS
from kvpolicy.traces.sources import SOURCES, TRACE_SPLITS

# KVzapRunConfig.collection()'s settings, by the flag that sets each
COLLECTION_FLAGS = {"source": "--source", "context_tokens": "--context", "seed": "--seed",
                    "tokens_per_prompt": "--tokens-per-prompt"}


@dataclass(frozen=True)
class MLPConfig:
    """The MLP's fit, NVIDIA's recipe (kvzap/train.py): hidden width (0: the model's hidden size / 8, the paper's
    ratio: 512 for its 4096-wide models; 72 for SmolLM2, whose 576-wide MLP of 512 fitted no better on held-out
    prompts, R² 0.489 against 0.502, and took 18 MB to ship against 2.5 MB), AdamW at lr with cosine
    annealing over the epochs, minibatches of `batch`, the gradient norm clipped at `clip`, `valid_fraction` of the
    tokens held out for a validation loss; `seed` (--fit-seed) fixes the initialization, the split and the
    batches."""

    hidden: int = 0
    epochs: int = 15
    lr: float = 5e-3
    batch: int = 512
    clip: float = 1.0
    valid_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self):
        if self.hidden < 0 or min(self.epochs, self.batch) < 1 or self.lr <= 0 or self.clip <= 0:
            raise KVPError("the KVzap MLP needs --mlp-hidden >= 0 (0: the model's width / 8), --mlp-epochs and "
                           "--mlp-batch >= 1, a positive "
                           "learning rate and clip")
        if not 0 <= self.valid_fraction < 1:
            raise KVPError(f"the MLP's validation fraction must be in [0, 1), got {self.valid_fraction}")


@dataclass(frozen=True)
class KVzapRunConfig:
    """One `kvp train-kvzap` run: targets and inputs of the first `n` prompts of `source`/`split` (the prompts `kvp
    traces` records) at `context_tokens`, `tokens_per_prompt` sampled per prompt (`seed` fixes the prompts and the
    sample: the collected data), and of `val_n` prompts of `val_split` for the held-out R² (0: none); then the
    `kinds` fitted (ridge with `alpha`, the MLP, whose own seed is `mlp.seed`)."""

    source: str = "mix"
    split: str = "train"
    n: int = 64
    context_tokens: int = 2048
    val_split: str = "val"
    val_n: int = 16
    tokens_per_prompt: int = 500
    kinds: tuple[str, ...] = KINDS
    alpha: float = 1.0
    seed: int = 0
    mlp: MLPConfig = field(default_factory=MLPConfig)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise KVPError(f"unknown prompt source '{self.source}'; use one of: {', '.join(SOURCES)}")
        if {self.split, self.val_split} - set(TRACE_SPLITS):
            raise KVPError(f"KVzap trains on the trace splits {', '.join(TRACE_SPLITS)}; got '{self.split}' and "
                           f"'{self.val_split}'")
        if self.val_n and self.val_split == self.split:
            raise KVPError(f"the held-out R² needs prompts training never sees: give a --val-split other than "
                           f"'{self.split}'")
        if self.n < 1 or self.val_n < 0 or self.tokens_per_prompt < 1 or self.context_tokens < 16:
            raise KVPError("need --n >= 1, --val-n >= 0, --tokens-per-prompt >= 1 and --context >= 16")
        if not self.kinds or set(self.kinds) - set(KINDS):
            raise KVPError(f"--kind takes {' and/or '.join(KINDS)}, got {' '.join(self.kinds) or 'none'}")
        if self.alpha <= 0:
            raise KVPError(f"the ridge penalty --alpha must be positive, got {self.alpha}")

    def collection(self) -> dict:
        """What fixes the collected data of a split (a directory holding data collected otherwise is refused)."""
        return {"source": self.source, "context_tokens": self.context_tokens, "seed": self.seed,
                "tokens_per_prompt": self.tokens_per_prompt}

    def collection_difference(self, recorded: dict) -> tuple[str, str]:
        """The collection settings where `recorded` (another run's `collection()`) and this run's differ, each side as
        flags: ("--seed 1", "--seed 0"); empty strings when they agree."""
        mine = self.collection()
        differ = [key for key in dict.fromkeys([*recorded, *mine]) if recorded.get(key) != mine.get(key)]
        flags = [COLLECTION_FLAGS.get(key, key) for key in differ]
        return (" ".join(f"{flag} {recorded.get(key)}" for flag, key in zip(flags, differ)),
                " ".join(f"{flag} {mine.get(key)}" for flag, key in zip(flags, differ)))

    def command(self, model: str, out: str, data: str) -> str:
        """The `kvp train-kvzap` command line of this run, every setting spelled out (the data directory too)."""
        m = self.mlp
        return shlex.join([
            "kvp", "train-kvzap", "--model", model, "--source", self.source, "--split", self.split, "--n", str(self.n),
            "--context", str(self.context_tokens), "--val-split", self.val_split, "--val-n", str(self.val_n),
            "--tokens-per-prompt", str(self.tokens_per_prompt), "--kind", *self.kinds, "--alpha", str(self.alpha),
            "--seed", str(self.seed), "--fit-seed", str(m.seed), "--mlp-hidden", str(m.hidden), "--mlp-epochs",
            str(m.epochs), "--mlp-lr", str(m.lr), "--mlp-batch", str(m.batch), "--data", data, "--out", out])
