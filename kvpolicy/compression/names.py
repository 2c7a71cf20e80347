"""The names of the learned policy on the command line, as plain values (no torch). The other scorers' names, labels
and kinds are the rows of `compression/catalog.py`."""

LEARNED = "kvp"  # the bare name: `kvp generate --scorer kvp` means the policy bundled for --model
LEARNED_PREFIX = f"{LEARNED}:"  # `kvp:CHECKPOINT` or `kvp:MODEL` names a learned policy
