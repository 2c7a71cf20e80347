"""What a preset of `kvp experiment` is: a config whose stages are `kvp` commands writing into one output directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


COLLECTIVE = ("traces", "train", "sweep")  # the commands that run on every rank of torchrun, each doing its share


@dataclass(frozen=True)
class Stage:
    """One `kvp` command of a preset; `name` identifies it in OUT/stages.json and `--stage`."""

    name: str
    argv: tuple[str, ...]

    @property
    def collective(self) -> bool:
        """Whether every rank runs it under torchrun, each doing its share (`COLLECTIVE`); rank 0 runs others alone."""
        return self.argv[0] in COLLECTIVE

    @property
    def output(self) -> Path | None:
        """What the stage writes: the path after `--out`; None for a stage that writes outside the output directory
        (`kvp policies --bundle` writes into the package)."""
        return Path(self.argv[self.argv.index("--out") + 1]) if "--out" in self.argv else None


class PresetConfig(Protocol):
    """The sizes of one preset (a frozen dataclass), from which its commands follow."""

    model: str

    @property
    def summary(self) -> str:
        """What the preset runs, in one line (`kvp experiment --list`)."""

    def default_out(self, name: str) -> str:
        """The output directory when `kvp experiment --preset NAME` is given no --out."""

    def stages(self, out: Path) -> list[Stage]:
        """The commands, in order, writing into `out`."""


def traces_command(model: str, source: str, split: str, n: int, context: int, future_tokens: int, out: Path,
                   *extra: str) -> tuple[str, ...]:
    """The `kvp traces` command of a preset: n prompts of source/split at `context` tokens, greedy futures of
    `future_tokens`, into `out`; `extra` arguments after it."""
    return ("traces", "--model", model, "--source", source, "--split", split, "--n", str(n), "--context", str(context),
            "--future-tokens", str(future_tokens), "--out", str(out), *extra)
