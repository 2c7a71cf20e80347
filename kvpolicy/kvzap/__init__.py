"""KVzap, trained by kvpolicy: per-layer models that predict KVzip+ scores from the hidden states entering
attention (arXiv 2601.07891), fitted on the prompts KVP trains on; `kvp train-kvzap`.

config.py (the run's settings, no torch) · collect.py (inputs and log KVzip+ targets per prompt, cached) · fit.py
(ridge in closed form beside its slow reference, the MLP's loop, R²) · pipeline.py (a resumable run) · cli.py.
The weights' format, and the weights shipped per model, are kvpolicy.policy.kvzap's; the scorers that use them
are compression/scorers/kvzap.py's.
"""
