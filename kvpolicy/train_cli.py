"""`kvp train --traces DIR --out CKPT [--val DIR] [--steps N] ...`: train the KVP agents of a model on traces, and
say how the best validation reward compares with the best attention-free heuristic on the same validation traces
(the evaluation's ranking costs, so this command sits on top of the stages, as `kvp sweep` does).

Run under `torchrun --nproc_per_node K -m kvpolicy.cli train ...` for data-parallel training (gloo on CPU,
nccl on GPU); rank 0 validates and writes the checkpoint. Re-running the same command resumes a killed run.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from kvpolicy.policy.config import POSITION_ENCODINGS, PolicyConfig
from kvpolicy.training.config import PAPER, TrainConfig

_DEFAULTS = TrainConfig()
_POLICY_DEFAULTS = {
    f.name: f.default for f in fields(PolicyConfig) if f.name not in ("n_layers", "n_kv_heads", "head_dim")
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--traces", required=True, nargs="+", metavar="DIR",
                        help="training traces (from `kvp traces`); several sets of one model are read as one")
    parser.add_argument("--out", required=True, metavar="CKPT",
                        help="checkpoint directory to write (resumed if present)")
    parser.add_argument("--val", nargs="+", metavar="DIR",
                        help="held-out validation traces, one or several sets (default: hold out 10%% of --traces)")
    parser.add_argument("--steps", type=int, default=_DEFAULTS.steps,
                        help=f"optimizer steps (default {_DEFAULTS.steps})")
    parser.add_argument("--batch", type=int, default=_DEFAULTS.batch, help="prompts per step, over all processes")
    parser.add_argument("--tokens", type=int, default=_DEFAULTS.tokens,
                        help="random evictable tokens ranked per prompt (0 = all)")
    parser.add_argument("--samples", type=int, default=_DEFAULTS.samples,
                        help="rankings sampled per prompt (RLOO group)")
    parser.add_argument("--lr", type=float, default=_DEFAULTS.lr,
                        help=f"peak learning rate (default {_DEFAULTS.lr}; paper {PAPER['lr']})")
    parser.add_argument("--warmup", type=int, default=_DEFAULTS.warmup, help="linear warm-up steps")
    parser.add_argument("--val-every", type=int, default=_DEFAULTS.val_every,
                        help="validate (and keep the best) every N steps")
    parser.add_argument("--prompts", type=int, default=0,
                        help="train on the first N training traces only (0 = all; for learning curves)")
    parser.add_argument("--val-samples", type=int, default=_DEFAULTS.val_samples, help="validation prompts")
    parser.add_argument("--checkpoint-every", type=int, default=_DEFAULTS.checkpoint_every,
                        help="write a resumable checkpoint every N steps")
    parser.add_argument("--hidden", type=int, default=_POLICY_DEFAULTS["hidden"],
                        help="policy hidden width (paper 256)")
    parser.add_argument("--hidden-states", action="store_true",
                        help="agents also read each token's input hidden state of their layer, through a learned "
                             "projection (traces from `kvp traces --hidden-states`; such a policy ranks a whole "
                             "prefill, as KVzap does)")
    parser.add_argument("--state-features", type=int, default=_POLICY_DEFAULTS["hidden_state_features"],
                        help="width of that projection per agent (default "
                             f"{_POLICY_DEFAULTS['hidden_state_features']})")
    parser.add_argument("--position-encoding", choices=POSITION_ENCODINGS,
                        default=_POLICY_DEFAULTS["position_encoding"])
    parser.add_argument("--max-position", type=int, default=None,
                        help="learned position table size (default: longest trace)")
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 instead of bfloat16 matmuls")
    parser.add_argument("--no-compile", action="store_true", help="do not torch.compile the policy")
    parser.add_argument("--paper", action="store_true", help=f"use the paper's training values {PAPER} (slow here)")
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--restart", action="store_true",
                        help="overwrite an existing checkpoint instead of resuming it")


def run(args: argparse.Namespace) -> int:
    from kvpolicy.distributed import init_distributed, shutdown_distributed
    from kvpolicy.evaluation.bench.ranking_quality import best_attention_free
    from kvpolicy.traces.union import open_traces
    from kvpolicy.models.placement import resolve_device
    from kvpolicy.training.data import states_width
    from kvpolicy.training.trainer import Trainer

    train = open_traces(args.traces)
    val = open_traces(args.val) if args.val else None
    values = dict(
        steps=args.steps, batch=args.batch, tokens=args.tokens, samples=args.samples, lr=args.lr, warmup=args.warmup,
        val_every=args.val_every, val_samples=args.val_samples, checkpoint_every=args.checkpoint_every,
        bf16=not args.no_bf16, compile=not args.no_compile, seed=args.seed, prompts=args.prompts,
    )
    config = TrainConfig(**(values | PAPER if args.paper else values))
    model = train.model
    policy = PolicyConfig(
        model.n_layers, model.n_kv_heads, model.head_dim, hidden=args.hidden,
        position_encoding=args.position_encoding, max_position=args.max_position or max(train.lengths),
        hidden_state_dim=states_width(train) if args.hidden_states else 0,  # traces without states: refused here
        hidden_state_features=args.state_features,
    )
    ctx = init_distributed(resolve_device(args.device).type)  # a CUDA request without CUDA: one line
    try:
        trainer = Trainer(train, args.out, val=val, policy=policy, config=config, ctx=ctx, resume=not args.restart)
        if ctx.main and trainer.step:
            print(f"resuming {args.out} at step {trainer.step}/{config.steps}")
        result = trainer.run()
    finally:
        shutdown_distributed(ctx)
    if ctx.main:
        heuristic, cost = best_attention_free(trainer.val_source, trainer.val_ids, config.sinks, config.recent)
        print(
            f"trained {model.n_agents} agents of {model.name} for {result.steps} steps "
            f"in {result.seconds:.0f} s ({result.steps_per_s:.2f} steps/s, {result.tokens_per_s:,.0f} tokens/s, "
            f"{ctx.world} process(es)); best validation reward {result.best_val_reward:.4f} at step {result.best_step} "
            f"(-1 = oracle; best attention-free heuristic on these traces: {heuristic} {-cost:.4f}); "
            f"{result.skipped_batches} batches skipped; {result.n_parameters:,} parameters -> {args.out}"
        )
    return 0
