"""Report: figures (matplotlib, Agg) and tables from a results file, as self-contained HTML and Markdown.

`ReportPaths` and `write_report` are imported on first use, so `kvp --help` never imports matplotlib.
"""

import importlib

__all__ = ["ReportPaths", "write_report"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'kvpolicy.report' has no attribute '{name}'")
    return getattr(importlib.import_module("kvpolicy.report.render"), name)
