"""The names and defaults `kvp traces` offers, as plain values (no torch), so its help never imports the recorder."""

# query-based baseline scores a trace can store per sample (traces/baselines.py), named as the scorers are
BASELINES = ("tova", "snapkv", "snapkv_w16")
DEFAULT_SHARD_BYTES = 128 << 20
# A shard is also written after this many samples or seconds since its first sample: at 128 MiB alone a small run
# buffers everything and a kill (SIGKILL skips the final flush) keeps nothing. 8 samples bound what a kill loses on
# fast short prompts while keeping shards few (n / 8; a reader maps them lazily, and a map holds no file
# descriptor); 120 s bound it on slow ones (long contexts, CPU) to two minutes plus the sample in progress.
DEFAULT_SHARD_SAMPLES = 8
DEFAULT_SHARD_SECONDS = 120.0
