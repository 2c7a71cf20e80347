"""Scorer registry: every eviction method by name. `make_scorer("knorm")`, `make_scorer("kvp:ckpt/")`.

The methods are the rows of `compression/catalog.py`; `SCORERS` maps their names to their classes, each imported on
first use, and a class is also importable from here by its name (`from kvpolicy.compression.scorers import
KnormScorer`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from kvpolicy.compression.catalog import CATALOG, parse_spec
from kvpolicy.compression.names import HEAD, LEARNED, LEARNED_PREFIX, split_mode, with_mode
from kvpolicy.compression.scorers.base import ALL_QUERIES, LayerView, Scorer
from kvpolicy.errors import KVPError


class _Registry(Mapping):
    """name -> scorer class, read from the catalog at each use (so a row added later is found too)."""

    def __getitem__(self, name: str) -> type[Scorer]:
        return CATALOG[name].load()

    def __iter__(self) -> Iterator[str]:
        return iter(list(CATALOG))

    def __len__(self) -> int:
        return len(CATALOG)

    def __repr__(self) -> str:
        return f"SCORERS({', '.join(CATALOG)})"


SCORERS: Mapping[str, type[Scorer]] = _Registry()


def known_scorers() -> str:
    """Every name make_scorer takes, for help texts and errors."""
    return ", ".join([*CATALOG, f"{LEARNED_PREFIX}MODEL", f"{LEARNED_PREFIX}CHECKPOINT"])


def bundled_spec(model: str) -> str:
    """What the bare name `kvp` means for the model called `model` (a registered name, a directory or a hub id): the
    policy bundled for it, `kvp:MODEL`. A model without one is refused, told how to train one."""
    from kvpolicy.policy.bundled import bundled_path

    bundled_path(model)
    return f"{LEARNED_PREFIX}{model}"


def named_scorer(spec: str, model: str) -> Scorer:
    """The scorer a user names for the model called `model` (`kvp generate --scorer`, `kvp.generate(scorer=...)`):
    any name make_scorer takes, an allocation suffix included, where plain `kvp` is the policy bundled for it."""
    base, mode = split_mode(spec)
    return make_scorer(with_mode(bundled_spec(model), mode) if base == LEARNED else spec)


def make_scorer(spec: str, **kw) -> Scorer:
    """A scorer from its registry name (settings as keyword arguments), `NAME:VALUE` for a row that takes one setting
    that way (e.g. `kvzap_mlp:DIR`, weights=DIR), `kvp:PATH` (a learned policy checkpoint), `kvp:MODEL` (the policy
    bundled for a model) or plain `kvp` with model=ModelInfo (the policy bundled for that model, `bundled_spec`).

    Any of them with the suffix `@layer` or `@model` (compression/names.py) moves the budget between heads and layers
    (scorers/allocated.py). The oracle needs `utility=` (per-layer future utility); unknown names raise a KVPError
    listing the known ones.
    """
    spec, mode = split_mode(spec)
    if mode != HEAD:
        from kvpolicy.compression.scorers.allocated import Allocated

        return Allocated(make_scorer(spec, **kw), mode)
    if spec.startswith(LEARNED_PREFIX):
        from kvpolicy.compression.scorers.learned import KVPScorer

        return KVPScorer(spec[len(LEARNED_PREFIX) :], **kw)
    if spec == LEARNED:
        if kw.get("model") is None:
            raise KVPError(f"'{spec}' names the policy bundled for the model it scores, and no model was given: pass "
                           f"model=ModelInfo, or use {LEARNED_PREFIX}MODEL for the policy bundled for a model (e.g. "
                           f"{LEARNED_PREFIX}smollm2-135m) or {LEARNED_PREFIX}CHECKPOINT for a trained one")
        return make_scorer(bundled_spec(kw["model"].name), **kw)
    entry, value = parse_spec(spec)
    if entry is None:
        settable = [f"{e.name}:{e.setting.upper()}" for e in CATALOG.values() if e.setting]
        raise KVPError(f"unknown scorer '{spec}'; known scorers: {known_scorers()}"
                       + (f" (and {', '.join(settable)})" if settable else ""))
    if value is not None:
        kw = {entry.setting: value, **kw}
    if entry.needs_utility and "utility" not in kw:
        raise KVPError(f"scorer '{spec}' needs the true future utility: "
                       f"make_scorer('{spec}', utility=per_layer_utility)")
    try:
        return entry.load()(**kw)
    except TypeError as err:
        raise KVPError(f"bad settings for scorer '{spec}': {err}") from None


def __getattr__(name: str):
    """A scorer class by its class name, imported on first use."""
    for entry in CATALOG.values():
        if entry.class_name == name:
            return entry.load()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ALL_QUERIES", "SCORERS", "LayerView", "Scorer", "bundled_spec", "known_scorers", "make_scorer",
           "named_scorer", *[e.class_name for e in CATALOG.values()]]
