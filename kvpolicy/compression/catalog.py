"""The scorer catalog: one row per eviction method, as plain values (no torch), so the command line's help and the
default line-ups never import the scorers. Every list of scorers is derived from it, when it is needed: the registry
(`scorers.SCORERS`, classes imported on first use), the names `kvp generate` / `kvp sweep` offer and their help, the
labels of results and figures, what the report counts as reading attention, the default line-ups of the sweep, the
benchmark and the experiment's long-generation stages, and the errors naming them.

Adding a scorer is its class in `compression/scorers/` and one row here (docs/ARCHITECTURE.md, "Where to add").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvpolicy.compression.names import mode_label, split_mode
from kvpolicy.lazy import check_reference, import_reference

# the default line-ups a row can join (its `defaults`)
SWEEP = "sweep"  # `kvp sweep` with no --scorer, the demo, the experiment's sweeps
BENCH = "bench"  # `kvp bench`'s ranking section; with SWEEP's, the experiment's baselines
STREAM = "stream"  # the experiment's long-generation stages: methods with a decoding form
LINEUPS = (SWEEP, BENCH, STREAM)


@dataclass(frozen=True)
class ScorerEntry:
    """One eviction method.

    name: what `--scorer` takes and results record (the class's `name`); label: what results and figures call it;
    scorer: its class as "module:Class", imported on first use; reads_attention: it ranks from queries (the
    question's, the chunk's just fed, or those of the model re-reading the cached text), so it cannot re-score the
    cache while decoding (the class's `query_window` > 0 or `reads_text` says the same; a test keeps them equal);
    press: the kvpress press whose scores it uses, if any (for AdaKV rows, the one kvpress's AdaKVPress wraps: the
    class's `allocation` spreads the budget as AdaKVPress does, compression/allocation.py);
    defaults: the default line-ups it joins (LINEUPS); needs_utility: it ranks by a trace's true future utility
    (the oracle): traces only; setting: the one setting a `--scorer NAME:VALUE` spec gives (e.g. `weights`, a
    directory of trained weights), None when the row takes no value."""

    name: str
    label: str
    scorer: str
    reads_attention: bool = False
    press: str | None = None
    defaults: tuple[str, ...] = ()
    needs_utility: bool = False
    setting: str | None = None

    def __post_init__(self):
        check_reference(self.scorer, f"scorer '{self.name}': give its class as 'module:Class'")
        unknown = set(self.defaults) - set(LINEUPS)
        if unknown:
            raise ValueError(f"scorer '{self.name}': unknown line-ups {sorted(unknown)}; known: {', '.join(LINEUPS)}")

    @property
    def class_name(self) -> str:
        return self.scorer.partition(":")[2]

    def load(self) -> Any:
        """The scorer class (imports its module)."""
        return import_reference(self.scorer)


_SCORERS = "kvpolicy.compression.scorers"
# in the order help texts and errors list them
CATALOG: dict[str, ScorerEntry] = {e.name: e for e in (
    ScorerEntry("random", "Random", f"{_SCORERS}.kvpress_backed:RandomScorer", press="RandomPress",
                defaults=(SWEEP, BENCH)),
    ScorerEntry("streaming_llm", "StreamingLLM", f"{_SCORERS}.streaming_llm:StreamingLLMScorer",
                defaults=(SWEEP, BENCH, STREAM)),
    ScorerEntry("knorm", "KNorm", f"{_SCORERS}.kvpress_backed:KnormScorer", press="KnormPress",
                defaults=(SWEEP, BENCH, STREAM)),
    ScorerEntry("keydiff", "KeyDiff", f"{_SCORERS}.kvpress_backed:KeyDiffScorer", press="KeyDiffPress",
                defaults=(SWEEP, BENCH, STREAM)),
    ScorerEntry("lagkv", "LagKV", f"{_SCORERS}.kvpress_backed:LagKVScorer", press="LagKVPress", defaults=(BENCH,)),
    ScorerEntry("tova", "TOVA", f"{_SCORERS}.kvpress_backed:TOVAScorer", reads_attention=True, press="TOVAPress",
                defaults=(SWEEP, BENCH, STREAM)),
    ScorerEntry("snapkv", "SnapKV (window 64)", f"{_SCORERS}.kvpress_backed:SnapKVScorer", reads_attention=True,
                press="SnapKVPress", defaults=(BENCH,)),
    ScorerEntry("snapkv_w16", "SnapKV (window 16)", f"{_SCORERS}.kvpress_backed:SnapKVFitScorer",
                reads_attention=True, press="SnapKVPress", defaults=(SWEEP, BENCH)),
    ScorerEntry("h2o", "H2O", f"{_SCORERS}.h2o:H2OScorer", reads_attention=True, defaults=(STREAM,)),
    ScorerEntry("expected_attention", "ExpectedAttention", f"{_SCORERS}.kvpress_backed:ExpectedAttentionScorer",
                reads_attention=True, press="ExpectedAttentionPress"),
    ScorerEntry("adakv_expected_attention", "AdaKV (ExpectedAttention)",
                f"{_SCORERS}.adaptive:AdaKVExpectedAttentionScorer", reads_attention=True,
                press="ExpectedAttentionPress"),
    ScorerEntry("adakv_snapkv", "AdaKV (SnapKV, window 64)", f"{_SCORERS}.adaptive:AdaKVSnapKVScorer",
                reads_attention=True, press="SnapKVPress"),
    ScorerEntry("adakv_snapkv_w16", "AdaKV (SnapKV, window 16)", f"{_SCORERS}.adaptive:AdaKVSnapKVFitScorer",
                reads_attention=True, press="SnapKVPress"),
    ScorerEntry("pyramidkv", "PyramidKV (window 64)", f"{_SCORERS}.adaptive:PyramidKVScorer", reads_attention=True,
                press="PyramidKVPress"),
    ScorerEntry("pyramidkv_w16", "PyramidKV (window 16)", f"{_SCORERS}.adaptive:PyramidKVFitScorer",
                reads_attention=True, press="PyramidKVPress"),
    ScorerEntry("kvzip", "KVzip", f"{_SCORERS}.kvzip:KVzipScorer", reads_attention=True, press="KVzipPress"),
    ScorerEntry("kvzip_plus", "KVzip+", f"{_SCORERS}.kvzip:KVzipPlusScorer", reads_attention=True,
                press="KVzipPress"),
    ScorerEntry("kvzap_linear", "KVzap (linear)", f"{_SCORERS}.kvzap:KVzapLinearScorer", reads_attention=True,
                press="KVzapPress", setting="weights"),
    ScorerEntry("kvzap_mlp", "KVzap (MLP)", f"{_SCORERS}.kvzap:KVzapMLPScorer", reads_attention=True,
                press="KVzapPress", setting="weights"),
    ScorerEntry("kvzap_linear_threshold", "KVzap (linear, thresholded)",
                f"{_SCORERS}.kvzap:KVzapLinearThresholdScorer", reads_attention=True, press="KVzapPress",
                setting="weights"),
    ScorerEntry("kvzap_mlp_threshold", "KVzap (MLP, thresholded)", f"{_SCORERS}.kvzap:KVzapMLPThresholdScorer",
                reads_attention=True, press="KVzapPress", setting="weights"),
    ScorerEntry("oracle", "Oracle", f"{_SCORERS}.oracle:OracleScorer", needs_utility=True),
)}


def scorer_names() -> tuple[str, ...]:
    """Every scorer's name, in catalog order."""
    return tuple(CATALOG)


def reads_attention() -> tuple[str, ...]:
    """The scorers that rank from queries (not attention-free)."""
    return tuple(e.name for e in CATALOG.values() if e.reads_attention)


def attention_free() -> tuple[str, ...]:
    """The scorers that rank from the cache alone (any time, decoding included); the oracle is not one."""
    return tuple(e.name for e in CATALOG.values() if not e.reads_attention and not e.needs_utility)


def needs_utility() -> tuple[str, ...]:
    """The scorers that rank by a trace's true future utility (the oracle): traces only."""
    return tuple(e.name for e in CATALOG.values() if e.needs_utility)


def default_lineup(*lineups: str) -> tuple[str, ...]:
    """The scorers that a default line-up (SWEEP, BENCH, STREAM) compares, or any of several, in catalog order."""
    unknown = [x for x in lineups if x not in LINEUPS]
    if unknown or not lineups:
        raise ValueError(f"unknown line-up '{', '.join(unknown)}'; known: {', '.join(LINEUPS)}")
    return tuple(e.name for e in CATALOG.values() if set(lineups) & set(e.defaults))


def parse_spec(spec: str) -> tuple[ScorerEntry | None, str | None]:
    """The row a `--scorer` spec names and the value a `NAME:VALUE` spec gives its `setting` (None: a plain name);
    (None, None) when no row takes the spec."""
    name, colon, value = spec.partition(":")
    entry = CATALOG.get(name)
    if entry is None or (colon and (entry.setting is None or not value)):
        return None, None
    return entry, value if colon else None


def label(spec: str) -> str:
    """What results and figures call a scorer: its row's label, with the last part of a `NAME:VALUE` spec's value
    and what an `@MODE` suffix adds (the spec itself when the catalog has no row for it)."""
    base, mode = split_mode(spec)
    entry, value = parse_spec(base)
    if entry is None:
        return spec
    return mode_label(f"{entry.label} {value.rstrip('/').rpartition('/')[2]}" if value else entry.label, mode)
