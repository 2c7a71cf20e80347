"""`kvp bench`: the figures that say what kvpolicy costs and saves, each a ratio measured side by side in one run.

One module per section: scoring.py (a: score + evict time vs the prefill), memory.py (b: cache bytes and peak
memory per budget), decode.py (c: decode speed, full vs compressed cache), answers.py (d: end-to-end answers
against kvpress's pipeline), throughput.py (e: trace recording and training speed) and ranking.py (held-out
ranking cost vs every baseline); timing.py holds the clock and the prompt they share, cli.py runs them.
"""
