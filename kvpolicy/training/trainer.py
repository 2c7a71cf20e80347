"""Train every KVP agent of a model at once with REINFORCE + leave-one-out baselines over Plackett–Luce rankings.

Each agent's scores define a Plackett–Luce distribution over rankings of a prompt's evictable tokens; a ranking
is rewarded by −(future attention it evicts, summed over every budget) / (the least any ranking evicts), so −1 is
the oracle (kvpolicy.policy.ranking). One step: draw `batch` prompts and `tokens` evictable tokens of each, score
them with all agents in one forward, sample `samples` rankings per prompt by Gumbel-sort, reward each, turn
rewards into RLOO advantages (standardized, clipped ±2) and minimise −mean(log π(σ)·advantage) per agent. AdamW
with warm-up + cosine decay, per-agent gradient-norm clipping (each agent is its own network, as in the paper's
one-by-one training), and an EMA of the weights that is validated with deterministic argsort on held-out traces
under the inference protocol (kvpolicy.policy.protocol); the best EMA by validation reward is the deployed
checkpoint.

Under torchrun every rank draws its own share of the batch, DistributedDataParallel averages the gradients and
rank 0 validates and writes checkpoints. A run restarted with the same arguments resumes from its last
checkpoint (kvpolicy.training.state; per-step random streams are derived from (seed, rank, step)); rank 0 holds
the checkpoint directory's lock (kvpolicy.training.lock) meanwhile, so a second run on it refuses at once.

A batch with non-finite values or gradients is skipped; a run in which most steps skip theirs (`too_many_skipped`:
a learning rate far too high, damaged traces or state) fails at its next checkpoint without writing it, so the last
good checkpoint is never overwritten by a state that cannot train.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvpolicy.distributed import DistContext
from kvpolicy.errors import KVPError
from kvpolicy.io import check_writable
from kvpolicy.policy import checkpoint as ckpt
from kvpolicy.policy.network import PolicyConfig, PolicyNet
from kvpolicy.policy.protocol import evictable_cost
from kvpolicy.policy.ranking import gumbel_sort, plackett_luce_logprob, reward, rloo_advantages
from kvpolicy.progress import bar
from kvpolicy.signals import deferred_interrupts
from kvpolicy.training.config import TrainConfig
from kvpolicy.traces.sources import DESCRIPTIONS
from kvpolicy.traces.union import check_same_model
from kvpolicy.training.data import TraceBatches, TraceSource, check_held_out, trace_sets
from kvpolicy.training.forward import training_forward, with_eager_fallback
from kvpolicy.training.lock import CheckpointLock
from kvpolicy.training.state import pack_resume, read_resume, unpack_resume

MIN_SKIPPED = 5  # fewer skipped steps than this never fail a run: too few to tell a broken run from bad luck


def too_many_skipped(skipped: int, steps: int) -> bool:
    """Whether `skipped` of the `steps` steps a run has taken skipped their batch mark it as broken: more than half,
    and at least MIN_SKIPPED. A few damaged traces skip a few batches; a diverged run skips nearly all."""
    return skipped >= MIN_SKIPPED and 2 * skipped > steps


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup` steps to `lr`, then cosine decay to `min_lr` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup - 1, 1)
    progress = min((step - cfg.warmup) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def clip_per_agent(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale each agent's gradient (its slice along axis 0 of every parameter) to norm <= max_norm.
    Returns the pre-clip norms (A,) (non-finite where a gradient is)."""
    sq = sum(p.grad.float().pow(2).reshape(p.shape[0], -1).sum(1) for p in params if p.grad is not None)
    norms = sq.sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale.to(p.grad.dtype).reshape(-1, *[1] * (p.dim() - 1)))
    return norms


def _per_layer(x: torch.Tensor, n_layers: int) -> list[float]:
    """(A,) per-agent values -> per-layer means, rounded for the log."""
    return [round(v, 5) for v in x.detach().float().reshape(n_layers, -1).mean(1).tolist()]


@dataclass
class TrainResult:
    out: Path
    steps: int
    best_step: int
    best_val_reward: float
    val_history: list[dict]
    skipped_batches: int
    seconds: float
    steps_per_s: float
    tokens_per_s: float  # ranked prompt tokens per second (each scored by every agent)
    n_parameters: int
    history: list[dict] = field(default_factory=list, repr=False)


def source_description(source: TraceSource) -> dict[str, Any]:
    """What a checkpoint records of its trace sets; a union of sets records each of its parts."""
    if parts := getattr(source, "parts", None):
        described = [source_description(p) for p in parts]
        contexts = {d["context_tokens"] for d in described}
        return {"manifest_hash": source.manifest_hash, "n_samples": len(source),
                "source": "+".join(str(d["source"]) for d in described),
                "context_tokens": contexts.pop() if len(contexts) == 1 else None, "parts": described}
    manifest = getattr(source, "manifest", {}) or {}
    return {
        "directory": str(getattr(source, "directory", "")),
        "manifest_hash": getattr(source, "manifest_hash", ""),
        "n_samples": len(source),
        "source": manifest.get("source"),
        "data": DESCRIPTIONS.get(manifest.get("source")),
        "split": manifest.get("split"),
        "context_tokens": manifest.get("context_tokens"),
        "generation_seconds": manifest.get("generation_seconds"),
    }


class Trainer:
    """Holds the networks, optimizer, EMA and data of one training run; `run()` trains to `config.steps`."""

    def __init__(
        self,
        train: TraceSource,
        out: str | Path,
        val: TraceSource | None = None,
        policy: PolicyConfig | None = None,
        config: TrainConfig | None = None,
        ctx: DistContext | None = None,
        resume: bool = True,
        progress: bool = True,
    ):
        self.cfg = cfg = config or TrainConfig()
        self.ctx = ctx or DistContext()
        self.out = Path(out)
        self.progress = progress
        if len(train) == 0:
            raise KVPError("the training trace set is empty: record traces with `kvp traces ... --n N` first")
        if val is not None:
            check_same_model(train, val)
            check_held_out(train, val)
        m = train.model
        policy = policy or PolicyConfig(m.n_layers, m.n_kv_heads, m.head_dim, max_position=max(train.lengths))
        if (policy.n_layers, policy.n_kv_heads, policy.head_dim) != (m.n_layers, m.n_kv_heads, m.head_dim):
            raise KVPError(f"policy shape {policy.to_dict()} does not match the traces' model {m.to_dict()}")
        self.policy_config = policy
        if cfg.batch % self.ctx.world:
            raise KVPError(f"batch {cfg.batch} must be divisible by the number of processes ({self.ctx.world})")
        self.local_batch = cfg.batch // self.ctx.world
        if cfg.samples == 1 and self.local_batch < 2:
            raise KVPError(f"batch {cfg.batch} over {self.ctx.world} processes leaves {self.local_batch} prompt per "
                           "rank; the leave-one-out baseline needs >= 2 (raise --batch or --samples)")
        self.lock = CheckpointLock(self.out)
        if self.ctx.main:  # before the traces are read or a step is taken
            check_writable(self.out, "checkpoint directory", directory=True)
            self.lock.acquire()  # held until run() ends
        try:
            self._prepare(train, val, resume)
        except BaseException:
            self.lock.release()
            raise

    def _prepare(self, train: TraceSource, val: TraceSource | None, resume: bool) -> None:
        """Data, networks, optimizer and the training state (the checkpoint's, when resuming)."""
        cfg, policy, m = self.cfg, self.policy_config, train.model
        # data: random evictable tokens of the training prompts, whole held-out prompts for validation
        self.train_ids, self.val_source, self.val_ids = self._split(train, val)
        if cfg.prompts:
            if cfg.prompts > len(self.train_ids):
                raise KVPError(f"--prompts {cfg.prompts} asks for more training traces than the {len(self.train_ids)} "
                               "there are; record more or ask for fewer")
            self.train_ids = self.train_ids[: cfg.prompts]
        first = trace_sets(train)[0]  # the parts of a union share their model
        recorded = (getattr(first, "manifest", None) or {}).get("model", {})
        # the architecture, for check_model, and a hybrid model's layer windows (which of its layers the agents cut)
        self.model = m.to_dict() | {key: recorded[key] for key in ("family", "layer_windows") if recorded.get(key)}
        self.traces = {"train": {**source_description(train), "prompts_used": len(self.train_ids)},
                       "val": source_description(self.val_source)}
        dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        states = bool(policy.hidden_state_dim)  # a policy that reads the layers' hidden states
        self.data = TraceBatches(train, cfg.tokens, cfg.sinks, cfg.recent, dtype, states)
        self.val_data = TraceBatches(self.val_source, 0, cfg.sinks, cfg.recent, states=states)
        self.data.preload(self.train_ids)
        if self.ctx.main:
            self.val_data.preload(self.val_ids)

        # networks: the trained one (identical initial weights on every rank), its EMA and best EMA, and the
        # network validation loads them into
        torch.manual_seed(cfg.seed)
        self.net = PolicyNet(policy).to(self.ctx.device)
        self.params = list(self.net.parameters())
        self.names = [name for name, _ in self.net.named_parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ema = [p.detach().clone() for p in self.params]
        self.best = [p.detach().clone() for p in self.params]
        self.eval_net = PolicyNet(policy).to(self.ctx.device).eval().requires_grad_(False)
        self.forward = training_forward(self.net, self.ctx, cfg.compile)

        self.step = 0
        self.skipped = 0
        self.best_step = -1  # no validation yet
        self.best_reward = -math.inf
        self.history: list[dict] = []
        self.val_history: list[dict] = []
        self.elapsed = 0.0
        self.saved_step: int | None = None  # the step of the checkpoint on disk that this run may continue
        if resume and ckpt.has_checkpoint(self.out):
            self._resume()

    def _split(self, train: TraceSource, val: TraceSource | None) -> tuple[list[int], TraceSource, list[int]]:
        """Training sample ids, the validation source and its ids (held out from `train` when no `val`)."""
        n_val = self.cfg.val_samples
        if val is not None:
            if len(val) == 0:
                raise KVPError("the validation trace set is empty: record traces with `kvp traces --split val`")
            return list(range(len(train))), val, list(range(min(n_val, len(val))))
        if len(train) < 2:
            warnings.warn("only one training trace and no --val: validating on the training trace itself", stacklevel=3)
            return [0], train, [0]
        held = min(n_val, max(1, len(train) // 10))
        return list(range(len(train) - held)), train, list(range(len(train) - held, len(train)))

    def config_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "policy": self.policy_config.to_dict(),
            "training": asdict(self.cfg),
            "traces": self.traces,
            "n_parameters": self.net.n_parameters(),
        }

    def _resume(self) -> None:
        state, tensors = read_resume(self.out, self.config_dict())
        unpack_resume(tensors, self.names, self.params, self.ema, self.best, self.opt, self.ctx.device)
        self.step, self.skipped, self.elapsed = state["step"], state["skipped_batches"], state["elapsed_s"]
        best = state["best_val_reward"]  # null for a run stopped before its first validation
        self.best_step, self.best_reward = (state["best_step"], best) if best is not None else (-1, -math.inf)
        self.val_history = state.get("val_history", [])
        self.history = ckpt.load_history(self.out)
        self.saved_step = self.step

    # ----- one step
    def generator(self) -> torch.Generator:
        """The random stream of this (seed, rank, step): resuming replays exactly the same batches and noise."""
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.ctx.rank * 10_007 + self.step)

    def train_step(self) -> dict[str, Any] | None:
        """One optimizer step; None when the batch was skipped (non-finite data or gradients)."""
        cfg, g = self.cfg, self.generator()
        pick = torch.randint(len(self.train_ids), (self.local_batch,), generator=g).tolist()
        batch = self.data.batch([self.train_ids[i] for i in pick], g).to(self.ctx.device)
        if self.ctx.any(not batch.finite()):
            return self._skip("non-finite values in the batch")

        scores = self.forward(batch.keys, batch.values, batch.positions, batch.lengths,
                              states=batch.states)  # (A, B, n)
        perms = gumbel_sort(scores, n_samples=cfg.samples, generator=g)  # (A, B, K, n)
        rewards = reward(batch.utility.unsqueeze(2), perms)  # (A, B, K)
        adv = rloo_advantages(rewards, clip=cfg.advantage_clip)
        logp = plackett_luce_logprob(scores.unsqueeze(2), perms)  # (A, B, K)
        loss = -(logp * adv).mean(dim=(1, 2)).sum()  # summed over agents: each agent's own objective

        lr = learning_rate(self.step, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norms = clip_per_agent(self.params, cfg.grad_clip)  # gradients are already averaged over ranks
        if not bool(torch.isfinite(norms).all()):
            self.opt.zero_grad(set_to_none=True)
            return self._skip("non-finite gradients")
        self.opt.step()

        with torch.no_grad():
            if self.step < cfg.ema_start:
                torch._foreach_copy_(self.ema, [p.detach() for p in self.params])
            else:
                torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - cfg.ema_decay)
        return {"lr": lr, "loss": float(loss.detach()), "grad_norm": norms, "reward": rewards.mean(dim=(1, 2)),
                "adv_abs": adv.abs().mean(dim=(1, 2)),
                "adv_clipped": (adv.abs() >= cfg.advantage_clip).float().mean(dim=(1, 2))}

    def _skip(self, why: str) -> None:
        self.skipped += 1
        warnings.warn(f"step {self.step}: skipped a batch with {why} ({self.skipped} skipped so far)", stacklevel=3)
        return None

    def _train_eagerly(self) -> None:
        """Give up torch.compile (it could not build on this machine): the forward runs uncompiled from now on."""
        self.cfg.compile = False
        self.forward = training_forward(self.net, self.ctx, compile=False)

    # ----- validation and checkpoints
    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Deterministic argsort of the EMA policy on every held-out prompt: per-agent mean protocol cost."""
        torch._foreach_copy_(list(self.eval_net.parameters()), self.ema)
        costs = torch.zeros(self.net.config.n_agents, device=self.ctx.device)
        for sample in self.val_ids:
            batch = self.val_data.full(sample).to(self.ctx.device)
            scores = self.eval_net(batch.keys, batch.values, batch.positions, batch.lengths,
                                   states=batch.states)  # (A, 1, T)
            costs += evictable_cost(scores, batch.utility, self.cfg.sinks, self.cfg.recent)[:, 0]
        costs /= len(self.val_ids)
        val_reward = float(-costs.mean())
        entry = {"step": self.step, "val_reward": round(val_reward, 5),
                 "val_reward_per_layer": _per_layer(-costs, self.policy_config.n_layers)}
        if val_reward > self.best_reward:
            self.best_reward, self.best_step = val_reward, self.step
            torch._foreach_copy_(self.best, self.ema)
        self.val_history.append(entry)
        return entry

    def save(self) -> None:
        """Write the checkpoint: the deployed weights (the best EMA; the EMA before any validation), the resume
        state and the training log."""
        state = {
            "step": self.step,
            "skipped_batches": self.skipped,
            "elapsed_s": round(self.elapsed, 2),
            "processes": self.ctx.world,
            "best_step": self.best_step,
            "best_val_reward": self.best_reward if self.best_step >= 0 else None,
            "val_history": self.val_history,
        }
        resume = pack_resume(self.names, self.params, self.ema, self.best, self.opt)
        deployed = self.best if self.best_step >= 0 else self.ema
        config = {**self.config_dict(), "state": state}
        ckpt.save_checkpoint(self.out, config, dict(zip(self.names, deployed)), resume, self.history)
        self.saved_step = self.step

    def check_skipped(self, first_step: int, skipped_before: int) -> None:
        """Fail the run, before it saves, when most of the steps it took since `first_step` skipped their batch
        (`skipped_before`: the count then): its state cannot train, and must not replace the last good checkpoint."""
        steps, skipped = self.step - first_step, self.skipped - skipped_before
        if not too_many_skipped(skipped, steps):
            return
        kept = (f"{self.out} keeps its checkpoint of step {self.saved_step}" if self.saved_step is not None
                else f"this run wrote nothing to {self.out}")
        raise KVPError(f"{skipped} of {steps} steps skipped non-finite batches: the learning rate may be too high or "
                       f"the traces or checkpoint damaged; {kept}: lower --lr, check the traces, or pass --restart")

    # ----- the loop
    def run(self) -> TrainResult:
        """Train from the current step to `config.steps`, validating, logging and checkpointing on the way."""
        cfg, main = self.cfg, self.ctx.main
        if main:
            self.lock.acquire()  # a no-op on the run that built this trainer; released when this run ends
        first_step, skipped_before, elapsed_before, t0 = self.step, self.skipped, self.elapsed, time.perf_counter()
        pbar = bar(desc="train KVP", total=cfg.steps, unit="step") if (main and self.progress) else None
        if pbar is not None and self.step:
            pbar.update(self.step)
        last_saved = self.step
        try:
            with deferred_interrupts() as interrupted:  # an interrupt stops between two whole steps
                while self.step < cfg.steps and not interrupted():
                    if self.step == first_step and cfg.compile:  # the compiler builds (or fails) on the first step
                        stats = with_eager_fallback(self.train_step, self._train_eagerly)
                    else:
                        stats = self.train_step()
                    self.step += 1
                    if stats is not None and main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                        self._log(stats)
                    if main and (self.step % cfg.val_every == 0 or self.step == cfg.steps):
                        entry = self.validate()
                        if pbar is not None:
                            pbar.set_postfix(val_reward=entry["val_reward"], best=round(self.best_reward, 4))
                    if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                        self.check_skipped(first_step, skipped_before)  # every rank counts the same skips
                        self.elapsed = elapsed_before + time.perf_counter() - t0
                        if main:
                            self.save()
                            last_saved = self.step
                        self.ctx.barrier()
                    if pbar is not None:
                        pbar.update(1)
        except KeyboardInterrupt:
            healthy = not too_many_skipped(self.skipped - skipped_before, self.step - first_step)
            if main and self.step > last_saved and healthy:
                self.elapsed = elapsed_before + time.perf_counter() - t0
                self.save()
            raise
        finally:
            if pbar is not None:
                pbar.close()
            if main:
                self.lock.release()
        return self.result(time.perf_counter() - t0, self.step - first_step)

    def result(self, seconds: float, steps_done: int) -> TrainResult:
        rate = steps_done / seconds if seconds > 0 else 0.0
        return TrainResult(
            out=self.out,
            steps=self.step,
            best_step=self.best_step,
            best_val_reward=self.best_reward,
            val_history=self.val_history,
            skipped_batches=self.skipped,
            seconds=self.elapsed,
            steps_per_s=rate,
            tokens_per_s=rate * self.cfg.batch * self.data.tokens,
            n_parameters=self.net.n_parameters(),
            history=self.history,
        )

    def _log(self, stats: dict[str, Any]) -> None:
        n_layers = self.policy_config.n_layers
        self.history.append({
            "step": self.step,
            "lr": stats["lr"],
            "loss": round(stats["loss"], 5),
            "reward": round(float(stats["reward"].mean()), 5),
            "reward_per_layer": _per_layer(stats["reward"], n_layers),
            "advantage_abs_per_layer": _per_layer(stats["adv_abs"], n_layers),
            "advantage_clipped": round(float(stats["adv_clipped"].mean()), 4),
            "grad_norm_per_layer": _per_layer(stats["grad_norm"], n_layers),
            "skipped_batches": self.skipped,
        })
