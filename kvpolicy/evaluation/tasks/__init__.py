"""The benchmarks a sweep can run: the catalog of their names (tasks/catalog.py), the `Task` every kind derives
from (tasks/base.py) and one file per family of benchmarks (ruler, needles, dialogue, longgen, zero_shot, traces).
Importing the package stays light: the benchmarks are imported when a name is resolved."""

from kvpolicy.evaluation.tasks.catalog import CATALOG, known_tasks, resolve_tasks, task_help

__all__ = ["CATALOG", "known_tasks", "resolve_tasks", "task_help"]
