"""The import rules of the pipeline layout, read from the source (lazy imports inside functions included), so a
later change cannot quietly make a lower stage depend on a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

import kvpolicy

PACKAGE = Path(kvpolicy.__file__).parent
BASE = {"errors", "io", "schema", "progress", "distributed", "signals", "lazy"}  # plain mechanics every stage may use
BELOW = {
    "models": set(),
    "data": {"models"},
    "traces": {"models", "data"},
    "policy": {"models"},
    "training": {"models", "data", "traces", "policy"},
    "compression": {"models", "data", "policy"},
    "evaluation": {"models", "data", "traces", "policy", "training", "compression"},
    "report": {"models", "data", "traces", "policy", "training", "compression", "evaluation"},
}
TOP = {"demo", "experiment", "cli", "__init__"}  # the CLI, the demo and the experiment presets sit on top of
# everything, as does each stage's cli.py


def stage_of(path: Path) -> str:
    """The stage a source file belongs to: its folder under kvpolicy/, or its own name for a top-level module."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imported_stages(path: Path) -> set[str]:
    """The kvpolicy stages a module imports anywhere in its body."""
    stages = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module + "." + alias.name for alias in node.names] if node.module == "kvpolicy" \
                else [node.module]
        stages |= {name.split(".")[1] for name in names if name.startswith("kvpolicy.")}
    return stages


def test_every_stage_imports_only_what_lies_below_it():
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        stage = stage_of(path)
        if stage in TOP or path.name == "cli.py":
            continue
        allowed = BASE if stage in BASE else BASE | {stage} | BELOW[stage]
        for found in sorted(imported_stages(path) - allowed):
            broken.append(f"{path.relative_to(PACKAGE.parent)} imports kvpolicy.{found}")
    assert not broken, "imports against the pipeline's direction:\n" + "\n".join(broken)


def test_the_rules_know_every_stage():
    stages = {stage_of(p) for p in PACKAGE.rglob("*.py")}
    assert stages <= set(BELOW) | BASE | TOP, stages - set(BELOW) - BASE - TOP
