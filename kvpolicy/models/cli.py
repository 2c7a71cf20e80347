"""`kvp models`: list the registry; `--load NAME` loads (and on first use converts) one model."""

from __future__ import annotations

import argparse
import time

from kvpolicy.models.placement import add_placement_arguments
from kvpolicy.models.registry import DEFAULT_MODEL, MODELS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", metavar="NAME", help="load this model and print its cache shape and fingerprint")
    add_placement_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.load:
        from kvpolicy.models.loader import load_model

        start = time.perf_counter()
        handle = load_model(args.load, device=args.device, dtype=args.dtype)
        info = handle.info
        print(f"loaded {info.name} in {time.perf_counter() - start:.1f}s on {handle.model.device}, "
              f"{handle.dtype_name}")
        for key, value in info.to_dict().items():
            print(f"  {key:14s} {value}")
        return 0
    for name, spec in MODELS.items():
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name:14s} {spec.family:6s} {spec.description}{default}")
    print("Any local Hugging Face model directory or 'org/name' hub id (online) works too.")
    return 0
