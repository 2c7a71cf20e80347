"""`kvp models`: list the registry; `--load NAME` loads (and on first use converts) one model; `--verify` checks
every byte of the converted caches against the sha256 recorded at conversion."""

from __future__ import annotations

import argparse
import time

from kvpolicy.models.placement import add_placement_arguments
from kvpolicy.models.registry import DEFAULT_MODEL, MODELS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", metavar="NAME", help="load this model and print its cache shape and fingerprint")
    parser.add_argument("--verify", nargs="*", metavar="NAME",
                        help="check the full sha256 of every file of these models' converted caches (default: every "
                        "converted cache); each load checks only sizes and sampled blocks")
    add_placement_arguments(parser)


def verify(names: list[str]) -> int:
    """Print, per converted cache, what was checked and what differs; a KVPError naming the damaged ones."""
    from kvpolicy.errors import KVPError
    from kvpolicy.models.loader import cache_root, verify_cache

    given = bool(names)
    names = names or [n for n in MODELS if (cache_root() / n).exists()]
    if not names:
        print(f"no converted model cache in {cache_root()}")
        return 0
    damaged = []
    for name in names:
        try:
            directory, files, problems = verify_cache(name)
        except KVPError as err:
            if given:
                raise
            print(f"{name}: not checked: {err}")  # half-built, or converted by an older kvpolicy
            continue
        total = sum(f["size"] for f in files.values())
        print(f"{name}: {directory}: {len(files)} files, {total:,} bytes, full sha256 "
              f"{'differs' if problems else 'as recorded at conversion'}")
        for problem in problems:
            print(f"  damaged: {problem}")
        damaged += [name] if problems else []
    if damaged:
        raise KVPError(f"damaged converted cache of {', '.join(damaged)}; the next load converts it again "
                       f"(kvp models --load {damaged[0]})")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.verify is not None:
        return verify(args.verify)
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
