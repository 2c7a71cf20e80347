"""The scorer names `kvp generate` and `kvp sweep` offer, as plain values (no torch), so their help never imports
the scorers. `SCORER_NAMES` lists `scorers.SCORERS`'s keys in order (a test keeps the two equal)."""

SCORER_NAMES = ("random", "streaming_llm", "knorm", "keydiff", "lagkv", "tova", "snapkv", "h2o", "expected_attention",
                "oracle")
LEARNED_PREFIX = "kvp:"  # `kvp:CHECKPOINT` names a learned policy
