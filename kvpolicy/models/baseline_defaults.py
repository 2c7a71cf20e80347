"""The settings of the query-based baselines TOVA and SnapKV, kvpress's defaults, in one place: compression runs
kvpress's presses with them (compression/scorers/kvpress_backed.py) and traces store the same scores batched over
layers (traces/baselines.py); tests keep them equal to kvpress's own. Plain values (no torch)."""

TOVA_WINDOW = 1  # TOVA reads the attention of the last prompt row (arXiv 2401.06104)
SNAPKV_WINDOW = 64  # SnapKV averages the attention of the prompt's last 64 rows (arXiv 2404.14469)
SNAPKV_KERNEL = 5  # and smooths it with an average pool this wide
# kvpress keeps SnapKV's whole observation window (max score), so at a budget of 64 entries per head the default
# window alone fills the cache: the `snapkv_w16` row runs SnapKV with a window that leaves at least 3/4 of every
# budget we evaluate (64 and up) to the ranked entries
SNAPKV_FIT_WINDOW = 16
