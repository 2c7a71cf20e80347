"""The scorer names `kvp generate` and `kvp sweep` offer, as plain values (no torch), so their help never imports
the scorers. `SCORER_NAMES` lists `scorers.SCORERS`'s keys in order (a test keeps the two equal)."""

SCORER_NAMES = ("random", "streaming_llm", "knorm", "keydiff", "lagkv", "tova", "snapkv", "h2o", "expected_attention",
                "oracle")
# the scorers that rank from queries (the attention of the question or of the tokens just fed), so not attention-free;
# a test keeps this equal to the registry's scorers whose `attention_free` is False
READS_ATTENTION = ("tova", "snapkv", "h2o", "expected_attention")
LEARNED = "kvp"  # the bare name: `kvp generate --scorer kvp` means the policy bundled for --model
LEARNED_PREFIX = f"{LEARNED}:"  # `kvp:CHECKPOINT` or `kvp:MODEL` names a learned policy
