"""Report: figures (matplotlib, Agg) and tables from a results file, as self-contained HTML and Markdown."""

from kvpolicy.report.render import ReportPaths, write_report

__all__ = ["ReportPaths", "write_report"]
