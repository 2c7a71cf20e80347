"""kvpolicy: learned per-head KV-cache eviction (KV Policy, KVP).

Pipeline: models → data → traces → training → compression → evaluation → report.
"""

__version__ = "0.1.0"
