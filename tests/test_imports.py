"""The import rules of the pipeline layout, read from the source, so a later change cannot quietly make a lower stage
depend on a higher one. Every import counts wherever it stands: at the top of a module, inside a function (a lazy
import), relative, or a constant name given to importlib.import_module; the command modules (each stage's cli.py)
follow their stage's rules, and the modules on top never import the command line that loads them."""

from __future__ import annotations

import ast
from pathlib import Path

import kvpolicy

PACKAGE = Path(kvpolicy.__file__).parent
# plain mechanics every stage may use; they import each other only
BASE = {"errors", "io", "byte_locks", "schema", "progress", "distributed", "signals", "lazy", "intervals",
        "significance"}
BELOW = {
    "models": set(),
    "data": {"models"},
    "traces": {"models", "data"},
    "policy": {"models"},
    "training": {"models", "data", "traces", "policy"},
    "compression": {"models", "data", "policy"},
    "kvzap": {"models", "data", "traces", "policy", "compression"},
    "evaluation": {"models", "data", "traces", "policy", "training", "compression", "kvzap"},
    "report": {"models", "data", "traces", "policy", "training", "compression", "evaluation", "kvzap"},
    # `kvp experiment`'s presets: plain values naming the commands' arguments, read from the light modules
    "presets": {"models", "policy", "compression", "evaluation"},
}
# the modules on top of every stage, with the other top modules each may import: kvpolicy/cli.py and
# kvpolicy/commands.py load the command modules by name when a command runs, and no command imports them back
TOP = {
    "__init__": set(),  # the Python API: its names are imported on first use
    "commands": set(),  # the pipeline's commands and how one command line runs
    "sweep_cli": set(),  # `kvp sweep`: evaluation, then the summary and --report
    "chat_cli": set(),  # `kvp chat`: a conversation on a compressed cache, streamed
    "train_cli": set(),  # `kvp train`: training, then the best attention-free heuristic's cost on its validation traces
    "export_cli": set(),  # `kvp export`: a policy folder with the held-out costs a results file holds
    "demo": {"experiment"},  # the demo preset, run by the experiment's runner
    "fit": {"experiment"},  # `kvp fit`: the recipe for any model, run by the experiment's runner
    "experiment": {"commands"},  # runs its stages through commands.run_command
    "cli": {"commands"},
}
COMMAND_LINE = {"cli", "commands"}  # import no stage at all: the commands come by name, lazily


def stage_of(path: Path) -> str:
    """The stage a source file belongs to: its folder under kvpolicy/, or its own name for a top-level module."""
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def _module_name(path: Path) -> str:
    parts = ("kvpolicy", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every kvpolicy module a source file imports, anywhere in its body (function-level imports included)."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the package the file is in, `level - 1` packages up
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                module = ".".join([*base, *([module] if module else [])])
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return {name for name in found if name.startswith("kvpolicy.")}


def imported_stages(path: Path) -> set[str]:
    """The kvpolicy stages (and base and top modules) a source file imports anywhere in its body. `from kvpolicy
    import __version__` names the package itself, which every import of a submodule loads anyway."""
    known = set(BELOW) | BASE | set(TOP)
    return {name.split(".")[1] for name in imported_modules(path)} & known


def test_every_stage_imports_only_what_lies_below_it():
    """Each stage's modules, its cli.py among them, import only their stage, the stages below and the base."""
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        stage = stage_of(path)
        if stage in TOP:
            continue
        allowed = BASE if stage in BASE else BASE | {stage} | BELOW[stage]
        for found in sorted(imported_stages(path) - allowed):
            broken.append(f"{path.relative_to(PACKAGE.parent)} imports kvpolicy.{found}")
    assert not broken, "imports against the pipeline's direction:\n" + "\n".join(broken)


def test_the_top_modules_import_no_command_line_that_loads_them():
    broken = []
    for name, allowed_top in TOP.items():
        path = PACKAGE / f"{name}.py"
        allowed = BASE | allowed_top if name in COMMAND_LINE else BASE | set(BELOW) | allowed_top
        for found in sorted(imported_stages(path) - allowed - {name}):
            broken.append(f"kvpolicy/{name}.py imports kvpolicy.{found}")
    assert not broken, "imports against the layout's direction:\n" + "\n".join(broken)


def test_every_command_is_a_command_module_loaded_by_name():
    """`kvp`'s commands are each stage's cli.py or a module on top; the pipeline's commands (the ones `kvp
    experiment` runs) never include one that runs other commands."""
    from kvpolicy.cli import COMMANDS
    from kvpolicy.commands import STAGE_COMMANDS

    for module, _ in COMMANDS.values():
        parts = module.split(".")
        assert parts[0] == "kvpolicy" and (parts[-1] == "cli" or (len(parts) == 2 and parts[1] in TOP)), module
    runners = {name for name, imports in TOP.items() if "commands" in imports}
    assert not {module.split(".")[1] for module, _ in STAGE_COMMANDS.values()} & runners


def test_the_finder_sees_lazy_relative_and_by_name_imports(tmp_path, monkeypatch):
    source = PACKAGE / "data" / "probe_module.py"  # a path inside the package, read from tmp_path
    text = ("def f():\n    from kvpolicy.report import render\n"
            "from ..evaluation import sweep\n"
            "import importlib\nimportlib.import_module('kvpolicy.training.trainer')\n")
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text)
    assert imported_stages(source) == {"report", "evaluation", "training"}


def test_the_rules_know_every_stage():
    stages = {stage_of(p) for p in PACKAGE.rglob("*.py")}
    assert stages <= set(BELOW) | BASE | set(TOP), stages - set(BELOW) - BASE - set(TOP)
