"""The names of the learned policy and of the allocation modes on the command line, as plain values (no torch). The
other scorers' names, labels and kinds are the rows of `compression/catalog.py`."""

LEARNED = "kvp"  # the bare name: `kvp generate --scorer kvp` means the policy bundled for --model
LEARNED_PREFIX = f"{LEARNED}:"  # `kvp:CHECKPOINT` or `kvp:MODEL` names a learned policy

# `--allocation MODE`, or a scorer spec's `@MODE` suffix (`knorm@model`): how a cut spreads the budget
# (compression/allocation.py, `MODES`), with what results and figures add to the scorer's label
HEAD = "head"  # every head of every layer keeps the budget: the uniform cut, a spec without a suffix
ALLOCATION_MODES = {HEAD: "", "layer": "per-layer budget", "model": "model-wide budget"}
MODE_SEPARATOR = "@"


def split_mode(spec: str) -> tuple[str, str]:
    """(the scorer spec, its allocation mode) of `NAME@MODE`; (spec, HEAD) when it names no mode."""
    base, separator, mode = spec.rpartition(MODE_SEPARATOR)
    return (base, mode) if separator and mode in ALLOCATION_MODES else (spec, HEAD)


def with_mode(spec: str, mode: str) -> str:
    """The spec that names `spec` cut with allocation `mode` (the spec itself for HEAD)."""
    return spec if mode == HEAD else f"{spec}{MODE_SEPARATOR}{mode}"


def mode_label(label: str, mode: str) -> str:
    """A scorer's label with what its allocation mode adds ("KNorm (model-wide budget)"); the label for HEAD."""
    return label if mode == HEAD else f"{label} ({ALLOCATION_MODES[mode]})"
