"""Quiet output: silence library progress bars and warnings; one clean tqdm bar per stage of ours."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import TypeVar
from collections.abc import Iterable

from tqdm.auto import tqdm

T = TypeVar("T")


def silence_libraries() -> None:
    """Turn off transformers/datasets/hub progress bars and chatter (GGUF dequantization, tokenizer warnings)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE_LIBS", "1")
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("transformers", "datasets", "huggingface_hub", "kvpress", "gguf"):
        logging.getLogger(name).setLevel(logging.ERROR)


def bar(iterable: Iterable[T] | None = None, *, desc: str, total: int | None = None, unit: str = "it") -> tqdm:
    """One progress bar for one stage of our own work, with ETA; hidden when stderr is not a terminal
    unless KVP_PROGRESS=1, so logs and CI stay clean."""
    force = os.environ.get("KVP_PROGRESS")
    disable = (force == "0") or (force is None and not sys.stderr.isatty())
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, dynamic_ncols=True, leave=True)
