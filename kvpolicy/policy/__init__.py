"""The policy: what training writes and inference reads.

network.py (PolicyNet: every agent of a model as one batched module) · ranking.py (Plackett–Luce, Gumbel-sort,
ranking cost, reward, RLOO, each beside its slow reference) · protocol.py (the always-kept sinks and recent tokens,
and the ranking costs of the tokens between them) · checkpoint.py (save/load with fingerprint and shape checks).
"""
