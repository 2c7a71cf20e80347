"""`kvp train-kvzap`: train KVzap's per-layer models (linear, MLP) for a model on the prompts KVP trains on.

    kvp train-kvzap --model smollm2-135m --source mix --split train --n 64 --context 2048 --out DIR

Re-running the same command resumes: the prompts already collected in DIR/data are skipped. --ship then installs
DIR's weights as the ones kvpolicy ships for the model (`kvzap_linear` / `kvzap_mlp` use them by default).

--seed fixes the collected data (the prompts and the tokens sampled from them), --fit-seed (default: --seed) the MLP's
fit alone. Runs that differ only in what they fit share one data directory, collected once, through --data:

    kvp train-kvzap --model smollm2-135m --n 64 --seed 0 --fit-seed 1 --kind mlp --data DIR/data --out DIR-s1
"""

from __future__ import annotations

import argparse

from kvpolicy.kvzap.config import KINDS, KVzapRunConfig, MLPConfig
from kvpolicy.models.placement import add_placement_arguments
from kvpolicy.models.registry import DEFAULT_MODEL
from kvpolicy.traces.sources import SOURCES, TRACE_SPLITS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    run, mlp = KVzapRunConfig(), MLPConfig()
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registered model name or HF directory")
    parser.add_argument("--source", default=run.source, choices=SOURCES,
                        help="training prompts, as `kvp traces --source` reads them (default: %(default)s)")
    parser.add_argument("--split", default=run.split, choices=TRACE_SPLITS)
    parser.add_argument("--n", type=int, required=True, help="training prompts (samples 0..n-1 of the split)")
    parser.add_argument("--context", type=int, default=run.context_tokens, help="prompt length in the model's tokens")
    parser.add_argument("--val-split", default=run.val_split, choices=TRACE_SPLITS,
                        help="held-out prompts for the R² per layer")
    parser.add_argument("--val-n", type=int, default=run.val_n, help="held-out prompts (0: no held-out R²)")
    parser.add_argument("--tokens-per-prompt", type=int, default=run.tokens_per_prompt,
                        help="tokens sampled per prompt (NVIDIA's recipe: 500)")
    parser.add_argument("--kind", nargs="+", default=list(KINDS), choices=KINDS, help="the models to fit")
    parser.add_argument("--alpha", type=float, default=run.alpha, help="the linear model's ridge penalty")
    parser.add_argument("--seed", type=int, default=run.seed, help="the collected data's seed: the RULER "
                        "generator's (as `kvp traces --seed`) and the token sample's (default: %(default)s)")
    parser.add_argument("--fit-seed", type=int, help="the MLP fit's seed: initialization, validation split, batches "
                        "(default: --seed)")
    parser.add_argument("--mlp-hidden", type=int, default=mlp.hidden,
                        help="the MLP's width (0: the model's hidden size / 8, the paper's ratio)")
    parser.add_argument("--mlp-epochs", type=int, default=mlp.epochs)
    parser.add_argument("--mlp-lr", type=float, default=mlp.lr)
    parser.add_argument("--mlp-batch", type=int, default=mlp.batch)
    parser.add_argument("--out", required=True, help="output directory (resumable)")
    parser.add_argument("--data", help="the collected data's directory, which runs differing only in their fit can "
                        "share (default: OUT/data)")
    parser.add_argument("--ship", action="store_true", help="then install DIR's weights in the package as those "
                        "shipped for the model (kvpolicy/policy/kvzap_weights/MODEL/)")
    add_placement_arguments(parser)


def run_config(args: argparse.Namespace) -> KVzapRunConfig:
    """The run `args` ask for: --seed fixes the collected data, --fit-seed (default: --seed) the MLP's fit."""
    mlp = MLPConfig(hidden=args.mlp_hidden, epochs=args.mlp_epochs, lr=args.mlp_lr, batch=args.mlp_batch,
                    seed=args.seed if args.fit_seed is None else args.fit_seed)
    return KVzapRunConfig(source=args.source, split=args.split, n=args.n, context_tokens=args.context,
                          val_split=args.val_split, val_n=args.val_n, tokens_per_prompt=args.tokens_per_prompt,
                          kinds=tuple(dict.fromkeys(args.kind)), alpha=args.alpha, seed=args.seed, mlp=mlp)


def run(args: argparse.Namespace) -> int:
    from kvpolicy.kvzap.pipeline import train_kvzap
    from kvpolicy.models import load_model
    from kvpolicy.policy.kvzap import ship_kvzap

    cfg = run_config(args)
    handle = load_model(args.model, device=args.device, dtype=args.dtype)
    metrics = train_kvzap(handle, cfg, args.out, args.data)
    data = metrics["data"]
    print(f"KVzap for {handle.info.name} in {args.out}: {data['prompts']} {data['split']} prompts ({data['tokens']} "
          f"tokens), {sum(metrics['collected_now'].values())} collected now ({metrics['collect_seconds']:.0f} s)")
    for kind, result in metrics["kinds"].items():
        held_out = f"held-out R² {result['r2_mean']:.3f}" if result["r2_mean"] is not None else "no held-out R²"
        print(f"  {kind:6s} {held_out} (mean over layers), in-sample {result['train_r2_mean']:.3f}, fitted in "
              f"{result['fit_seconds']:.0f} s")
    if args.ship:
        print(f"shipped -> {ship_kvzap(args.out)}")
    return 0
