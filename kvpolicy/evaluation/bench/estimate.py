"""What a plan of `kvp` commands (`kvp fit`'s) will cost on this machine: wall time per stage and bytes on disk,
extrapolated from throughput measured now, for this model on this device.

`measure_rates` (a few seconds): one prefill of MEASURE_CONTEXT random tokens and MEASURE_DECODE greedy decoding
steps of the model, then a few training steps of a policy of the model's cache shape on synthetic traces (bench
section e's `measure_training`, uncompiled). `estimate_plan` reads each stage's command and charges it:

- traces: per prompt of T tokens (the mix's 0.5x / 1x / 2x lengths: traces.sources.mix_plan) with F future tokens,
  (T + F) / the prefill rate (the prompt, then the future fed as one chunk) + F decoding steps; on disk
  layers x KV heads x T x (head_dim x 2 (keys and values) x 2 bytes (fp16) + 4 (utility, fp32) + 4 per stored
  baseline score (val and test sets store traces.config.BASELINES by default));
- train: torch.compile's one-off build (COMPILE_SECONDS, unless --no-compile) + steps / the measured step rate
  (validation left out); on disk the weights and the resume state (weights, EMA, best EMA, AdamW's two moments);
- a sweep on traces (held-out costs, no model run): COST_SECONDS per prompt token, layer, KV head and scorer;
- a sweep of answers: per sample one prefill of the context, then per budget and for the full cache one answer of
  --max-new-tokens decoding steps (a budget's scorers decode together, as one batch: counted as one answer);
- export: the policy folder's fp32 weights on disk; anything else (report, bundle): nothing.

Prefill is taken as linear in the tokens: from 128 to 4,096 tokens SmolLM2-135M prefilled 204-272 tokens/s on one
CPU thread (2026-12), so its attention's quadratic share is small at these lengths. Model loading is not counted:
the stages run in this process, which loaded the model to measure it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MEASURE_CONTEXT = 256  # prompt tokens of the measured prefill
MEASURE_DECODE = 8  # measured greedy decoding steps
MEASURE_TRAIN_STEPS = 3  # measured training steps, after a first one
# torch.compile's first training step, less an uncompiled one: 11.0 s for SmolLM2's 90 agents on a 2-core CPU
# (bench section e, 2026-12); not measured here, as it would take longer than everything else measured
COMPILE_SECONDS = 11.0
# ranking one held-out trace: seconds per (prompt token x layer x KV head x scorer), from the bundled recipes' costs
# stages on a 2-core CPU (docs/results/*-mix/stages.json: SmolLM2 6.4e-7, 20 traces x 14 scorers in 36 s;
# Qwen2.5 4.9e-7, 12 x 14 in 9 s)
COST_SECONDS = 6.4e-7
FP16, FP32 = 2, 4


@dataclass(frozen=True)
class Rates:
    """Throughput measured on one model and device: prefill tokens per second, seconds per greedy decoding step,
    training steps per second (uncompiled) and the policy's parameter count at the model's cache shape."""

    device: str
    prefill_tokens_per_s: float
    decode_step_s: float
    train_steps_per_s: float
    policy_parameters: int

    def describe(self) -> str:
        return (f"measured now on {self.device}: prefill {self.prefill_tokens_per_s:,.0f} tokens/s, decoding "
                f"{1000 * self.decode_step_s:,.0f} ms/token, training {self.train_steps_per_s:.2f} steps/s")


@dataclass(frozen=True)
class StageEstimate:
    name: str
    seconds: float
    bytes: int
    work: str  # what was counted, in a few words


@dataclass(frozen=True)
class Estimate:
    rates: Rates
    stages: list[StageEstimate]

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.stages)


def trace_seconds(rates: Rates, tokens: int, future: int) -> float:
    """Recording one trace: the prompt and the future chunk prefilled, the future decoded step by step."""
    return (tokens + future) / rates.prefill_tokens_per_s + future * rates.decode_step_s


def trace_bytes(shape: Any, tokens: int, baselines: int) -> int:
    """One trace on disk: fp16 keys and values, fp32 utility and `baselines` fp32 baseline scores per (layer, KV
    head, token); shape: n_layers, n_kv_heads, head_dim (a ModelInfo)."""
    return shape.n_layers * shape.n_kv_heads * tokens * (shape.head_dim * 2 * FP16 + FP32 + FP32 * baselines)


def checkpoint_bytes(parameters: int) -> int:
    """A `kvp train` checkpoint: fp32 weights, and the resume state's weights, EMA, best EMA and two AdamW moments."""
    return parameters * FP32 * 6


def _values(argv: Sequence[str], flag: str) -> list[str]:
    """The values after `flag` up to the next option ([] when it is absent)."""
    if flag not in argv:
        return []
    start = list(argv).index(flag) + 1
    end = next((i for i in range(start, len(argv)) if argv[i].startswith("--")), len(argv))
    return list(argv[start:end])


def _value(argv: Sequence[str], flag: str, default: str) -> str:
    return (_values(argv, flag) or [default])[0]


def prompt_lengths(argv: Sequence[str]) -> list[int]:
    """The prompt lengths a `kvp traces` command asks for (the mix's at 0.5x / 1x / 2x its context)."""
    from kvpolicy.traces.sources import mix_plan

    n, context = int(_value(argv, "--n", "0")), int(_value(argv, "--context", "2048"))
    if _value(argv, "--source", "") == "mix":
        return [length for _, _, length in mix_plan(n, context)]
    return [context] * n


def _traces(argv: Sequence[str], rates: Rates, shape: Any) -> tuple[float, int, str]:
    from kvpolicy.traces.config import BASELINES

    lengths, future = prompt_lengths(argv), int(_value(argv, "--future-tokens", "300"))
    stored = _value(argv, "--baselines", "auto")
    baselines = (len(BASELINES) if _value(argv, "--split", "train") != "train" else 0) if stored == "auto" else \
        len([b for b in stored.split(",") if b.strip() and b.strip() != "none"])
    seconds = sum(trace_seconds(rates, t, future) for t in lengths)
    return (seconds, sum(trace_bytes(shape, t, baselines) for t in lengths),
            f"{len(lengths)} prompts, {sum(lengths):,} tokens + {future} future tokens each")


def _train(argv: Sequence[str], rates: Rates) -> tuple[float, int, str]:
    steps = int(_value(argv, "--steps", "600"))
    compiled = "--no-compile" not in argv
    seconds = steps / rates.train_steps_per_s + (COMPILE_SECONDS if compiled else 0.0)
    return seconds, checkpoint_bytes(rates.policy_parameters), f"{steps} steps{' (+ compile)' if compiled else ''}"


def _sweep(argv: Sequence[str], rates: Rates, shape: Any, lengths: dict[str, list[int]]) -> tuple[float, int, str]:
    tasks, scorers, budgets = _values(argv, "--task"), _values(argv, "--scorer"), _values(argv, "--budget")
    n = int(_value(argv, "--n", "5"))
    traced = [lengths.get(task.removeprefix("traces:"), []) for task in tasks if task.startswith("traces:")]
    if traced:
        tokens = sum(sum(trace[:n]) for trace in traced)
        seconds = tokens * shape.n_layers * shape.n_kv_heads * len(scorers) * COST_SECONDS
        return seconds, 0, f"{sum(min(n, len(t)) for t in traced)} traces x {len(scorers)} scorers"
    contexts = [int(c) for c in _values(argv, "--context")] or [2048]
    answer = int(_value(argv, "--max-new-tokens", "16")) or 16
    answers = len(budgets) + ("--no-full-cache" not in argv)
    samples = n * len(tasks) * len(contexts)
    seconds = n * len(tasks) * sum(c / rates.prefill_tokens_per_s + answers * answer * rates.decode_step_s
                                   for c in contexts)
    return seconds, 0, f"{samples} samples x {len(budgets)} budgets x {len(scorers)} scorers"


def estimate_plan(stages: Sequence[Any], rates: Rates, shape: Any) -> Estimate:
    """Each stage's wall time and bytes on disk (module docstring); stages: `Stage`s (name, argv), in plan order;
    shape: the model's n_layers, n_kv_heads, head_dim."""
    lengths: dict[str, list[int]] = {}  # a trace set's directory -> its prompt lengths, for the costs read later
    estimates = []
    for stage in stages:
        argv = stage.argv
        if argv[0] == "traces":
            lengths[_value(argv, "--out", "")] = prompt_lengths(argv)
            seconds, size, work = _traces(argv, rates, shape)
        elif argv[0] == "train":
            seconds, size, work = _train(argv, rates)
        elif argv[0] == "sweep":
            seconds, size, work = _sweep(argv, rates, shape, lengths)
        elif argv[0] == "export":
            seconds, size, work = 0.0, rates.policy_parameters * FP32, "the policy folder"
        else:
            seconds, size, work = 0.0, 0, "negligible"
        estimates.append(StageEstimate(stage.name, seconds, size, work))
    return Estimate(rates, estimates)


def measure_rates(handle: Any, train_device: str | None = None, context: int = MEASURE_CONTEXT,
                  decode: int = MEASURE_DECODE, train_steps: int = MEASURE_TRAIN_STEPS) -> Rates:
    """Time the model `handle` (a ModelHandle) on its device: a prefill of `context` random tokens after a short
    warm-up, then `decode` greedy steps; then `train_steps` uncompiled training steps of a policy of its cache shape
    on synthetic traces, on `train_device` (None: CUDA when available), in a temporary directory."""
    import tempfile

    import torch
    from transformers import DynamicCache

    from kvpolicy.evaluation.bench.throughput import measure_training, synthetic_at_shape
    from kvpolicy.models.placement import synchronize

    model, info = handle.model, handle.info
    device = model.device
    context = max(2, min(context, info.max_positions - decode - 1))
    ids = torch.randint(0, len(handle.tokenizer), (1, context), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)

    def prefill(tokens: torch.Tensor) -> tuple[Any, torch.Tensor]:
        cache = DynamicCache(config=model.config)
        out = model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache, out.logits[:, -1]

    with torch.inference_mode():
        prefill(ids[:, : min(16, context)])  # first calls allocate and pick kernels
        synchronize(device)
        start = time.perf_counter()
        cache, logits = prefill(ids)
        synchronize(device)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(decode):
            step = logits.argmax(-1, keepdim=True)
            logits = model(input_ids=step, past_key_values=cache, use_cache=True).logits[:, -1]
        synchronize(device)
        decode_s = (time.perf_counter() - start) / max(decode, 1)
    with tempfile.TemporaryDirectory(prefix="kvp-estimate-") as tmp:
        shape = (info.n_layers, info.n_kv_heads, info.head_dim)
        training = measure_training(synthetic_at_shape(shape), train_steps, Path(tmp) / "policy", train_device,
                                    compile=False, progress=False)
    return Rates(device=str(device), prefill_tokens_per_s=context / prefill_s, decode_step_s=decode_s,
                 train_steps_per_s=training["steps_per_s"], policy_parameters=training["parameters"])


def duration(seconds: float) -> str:
    """'45 s', '12 min', '3.2 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def size(n: int) -> str:
    """'12 MB', '3.4 GB'."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"
