"""`kvp policies`: the KVP policies bundled with kvpolicy, `--bundle CKPT` to ship a trained one, and `--convert CKPT`
to write a policy folder of the first format (policy.safetensors, no card) in the current one."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", metavar="CKPT", help="write this `kvp train` checkpoint (fp16) as the bundled "
                        "policy of its model, in the package's kvpolicy/policy/weights/")
    parser.add_argument("--convert", metavar="CKPT", help="write this policy folder in the current format (model."
                        "safetensors and a README.md card; every file's bytes unchanged), in place or at --out")
    parser.add_argument("--out", metavar="DIR", help="with --convert: write the converted folder here instead")
    parser.add_argument("--made-by", action="append", default=[], metavar="CMD",
                        help="with --bundle: a command that made it (repeat, in order), recorded in the bundle")


def run(args: argparse.Namespace) -> int:
    from kvpolicy.errors import KVPError
    from kvpolicy.policy.bundled import bundle, bundled_policies
    from kvpolicy.policy.checkpoint import read_config

    if args.made_by and not args.bundle:
        raise KVPError("--made-by describes a policy being bundled: give --bundle CKPT too")
    if args.out and not args.convert:
        raise KVPError("--out says where --convert writes: give --convert CKPT too")
    if args.convert:
        from kvpolicy.policy.checkpoint import convert_checkpoint

        print(f"converted {args.convert} -> {convert_checkpoint(args.convert, args.out)}")
        return 0
    if args.bundle:
        target = bundle(args.bundle, {"commands": args.made_by})
        print(f"bundled {args.bundle} -> {target}")
    policies = bundled_policies()
    if not policies:
        print("no bundled policies in this install")
    for model, path in policies.items():
        config = read_config(path)  # checked: a damaged bundled config is one line, not a traceback
        made = config.get("bundle", {})
        training = config.get("training", {})
        traces = config.get("traces", {}).get("train", {})
        print(f"{model:14s} kvp:{model}  trained on {traces.get('source')} traces at {traces.get('context_tokens')} "
              f"tokens, {training.get('steps')} steps; fingerprint {made.get('model_fingerprint')}")
        for command in made.get("commands", []):
            print(f"{'':14s}   $ {command}")
    return 0
