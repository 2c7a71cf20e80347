"""`kvp chat`: an interactive chat whose cache stays bounded over any number of turns (a module on top, as
sweep_cli.py: each stage's cli.py is its one command).

Each user turn is fed on the cache of the conversation so far and the cache is cut back to the budget right after
(query-aware, `multi_turn.converse`); the reply is streamed as it is decoded, and with `--every N` the cache is also
cut back whenever decoding has added N entries, so a long reply cannot grow it either. After each reply a line on
stderr gives the cache's size: after the turn's cut, at the end of the reply, and the tokens seen so far.
`--file` reads the user turns from a file instead of the terminal (plain text: one turn per line; or a JSON list of
strings or of {"role": "user", "content": ...} messages), for scripting; an empty line or end of input ends the chat.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvpolicy.models.placement import add_placement_arguments
    from kvpolicy.models.registry import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or HF directory (default {DEFAULT_MODEL})")
    add_placement_arguments(parser)
    parser.add_argument("--scorer", default="kvp",
                        help="an attention-free eviction scorer: kvp (the policy bundled for --model; default), "
                             "kvp:DIR, knorm, streaming_llm, ... (kvp generate --help lists them)")
    parser.add_argument("--budget", type=int, required=True, help="entries kept per KV head after every turn")
    parser.add_argument("--every", type=int, default=32, metavar="N",
                        help="while replying, cut back to the budget each time N entries were added (default 32; "
                             "0: only after each turn)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest reply (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 (default): greedy")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling threshold (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling")
    parser.add_argument("--system", default=None, help="a system message to start the conversation with")
    parser.add_argument("--file", metavar="PATH", help="read the user turns from this file instead of the terminal")


def read_turns(path: str) -> list[str]:
    """The user turns of a conversation file: a JSON list (strings, or messages whose user turns are kept), or plain
    UTF-8 text with one turn per non-empty line."""
    import json

    from kvpolicy.errors import KVPError
    from kvpolicy.io import read_text_file

    text = read_text_file(path, "conversation file", "give a UTF-8 text or JSON file of user turns")
    if not text.lstrip().startswith("["):
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        items = json.loads(text)
    except ValueError as err:
        raise KVPError(f"conversation file {path} starts like JSON but is not ({err}); give a JSON list or plain "
                       "text with one turn per line") from None
    turns = []
    for item in items:  # a string, a user message (kept), or an assistant or system message (skipped)
        role = item.get("role") if isinstance(item, dict) else None
        if isinstance(item, str) or (role == "user" and isinstance(item.get("content"), str)):
            turns.append(item if isinstance(item, str) else item["content"])
        elif role not in ("assistant", "system"):
            raise KVPError(f"conversation file {path}: each item is a string or a {{'role', 'content'}} message")
    return turns


def _terminal() -> Iterator[str]:
    """User turns typed at the prompt, until an empty line or end of input."""
    while True:
        sys.stderr.write("you> ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line.strip():
            return
        yield line.strip()


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    from kvpolicy.compression.budget import Budget
    from kvpolicy.compression.engine import BoundedDecoding
    from kvpolicy.compression.multi_turn import TurnResult, converse
    from kvpolicy.compression.scorers import named_scorer
    from kvpolicy.errors import KVPError
    from kvpolicy.models import load_model
    from kvpolicy.models.decoding import Sampling
    from kvpolicy.models.text_stream import TextStream

    if args.every < 0 or args.max_new_tokens < 1:
        raise KVPError("--every must be >= 0 and --max-new-tokens >= 1")
    turns = read_turns(args.file) if args.file else None
    scorer = named_scorer(args.scorer, args.model)
    budget = Budget(tokens=args.budget)
    bounded = BoundedDecoding(scorer, budget, args.every) if args.every else None
    sampling = Sampling(args.temperature, args.top_p, args.seed)
    handle = load_model(args.model, device=args.device, dtype=args.dtype)
    stream: list[TextStream] = []

    def on_token(token: int) -> None:
        if not stream:
            stream.append(TextStream(handle.decode))
            _write("assistant> " if turns is None else "")
        _write(stream[0].push(token))

    def on_turn(result: TurnResult) -> None:
        _write((stream.pop().finish(result.text) if stream else "") + "\n")
        sys.stderr.write(f"[turn {result.turn + 1}: cache {result.cache_tokens_after} entries per KV head after the "
                         f"turn's cut, {result.cache_tokens_end} ({result.cache_bytes_end / 2**20:.2f} MiB) after the "
                         f"reply; {result.next_position} tokens seen]\n")

    source = iter(turns) if turns is not None else _terminal()
    results, _ = converse(handle, source, scorer, budget, max_new_tokens=args.max_new_tokens, system=args.system,
                          bounded=bounded, sampling=sampling, on_token=on_token, on_turn=on_turn)
    if results:
        replying = budget.tokens + args.every if bounded else max(r.cache_tokens_end for r in results)
        sys.stderr.write(f"{len(results)} turns; the cache held at most {max(r.cache_tokens_before for r in results)} "
                         f"entries per KV head at a turn's prefill (before its cut) and {replying} while replying\n")
    return 0
