"""The command line's conventions: `--version`, exit statuses (1 error, 2 usage), a help that imports no heavy
library, and a library that leaves its user's logging and warning filters alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import kvpolicy
from kvpolicy.cli import main

HEAVY = ("torch", "transformers", "kvpress", "datasets", "matplotlib")


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvp {kvpolicy.__version__}"


def test_an_error_exits_1_and_a_usage_error_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r")]) == 1  # a KVPError
    assert "kvp report: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path / "missing.jsonl")])  # --out is required
    assert exit_.value.code == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err


def test_help_imports_no_heavy_library():
    code = ("import sys, kvpolicy.cli as cli\n"
            "cli.build_parser()\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "", f"building the parser imported {run.stdout.strip()}"


@pytest.mark.parametrize("argv", [["--help"], ["sweep", "--help"], ["train", "--help"], ["generate", "--help"],
                                  ["fit", "--help"]])
def test_every_help_answers_without_heavy_imports(argv):
    code = ("import sys, kvpolicy.cli as cli\n"
            "try:\n"
            f"    cli.main({argv!r})\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: kvp" in run.stdout
    assert run.stderr.strip() == ""


def test_every_usage_error_exits_2_before_any_heavy_import():
    """An unknown flag, or a required argument left out, is argparse's usage error (exit 2) before torch or
    transformers are imported (a tenth of a second, not the seconds they take), for every command."""
    code = f"""
import contextlib, io, json, sys
from kvpolicy.cli import COMMANDS, build_parser, main

def usage_error(run, argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            run(argv)
        except SystemExit as exit_:
            return exit_.code, err.getvalue()
    return None, err.getvalue()

missing = {{}}
for name in COMMANDS:  # without its required arguments (parsed only: a command without any would run)
    code, err = usage_error(build_parser().parse_args, [name])
    if code is not None:
        missing[name] = [code, f"kvp {{name}}: error:" in err and "required" in err]
flags = {{name: usage_error(main, [name, "--no-such-flag"]) for name in COMMANDS}}
flags = {{name: [code, "usage: kvp" in err and "error:" in err] for name, (code, err) in flags.items()}}
print(json.dumps({{"missing": missing, "flags": flags,
                  "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    found = json.loads(run.stdout)
    assert found["heavy"] == [], f"a usage error imported {found['heavy']}"
    assert {"generate", "train", "traces", "sweep", "report"} <= set(found["missing"]), found["missing"]
    assert all(said == [2, True] for said in [*found["missing"].values(), *found["flags"].values()]), found


def test_light_name_lists_match_the_registries():
    from kvpolicy.compression.catalog import CATALOG
    from kvpolicy.evaluation.tasks import CATALOG as TASKS, resolve_tasks
    from kvpolicy.evaluation.tasks.longgen import LONGGEN

    for name, entry in CATALOG.items():  # the catalog's plain values say what the classes do
        cls = entry.load()
        assert cls.name == name and (cls.query_window != 0 or cls.reads_text) == entry.reads_attention
    for entry in TASKS:  # every row builds the tasks it names (traces:DIR needs a directory of traces)
        names = [f"{entry.one}:{m}" for m in entry.members] or [entry.name]
        assert entry.argument or [t.name for t in resolve_tasks([entry.name])] == names
    assert next(e.members for e in TASKS if e.name == "longgen") == tuple(LONGGEN)


# Run in a fresh interpreter: `main` quietens the libraries for the rest of its process, as the CLI should.
# The third-party libraries are imported first: their own import-time filters are theirs, not ours.
SETTINGS = """
import logging, warnings
import datasets, kvpress, matplotlib, requests, torch, transformers
from transformers.utils import logging as hf_logging

def settings():
    loggers = [logging.getLogger(n).level for n in ("transformers", "datasets", "huggingface_hub", "kvpress", "gguf")]
    return loggers, [str(f) for f in warnings.filters], hf_logging.get_verbosity()

before = settings()
"""
AFTER = "\nassert settings() == before, (before, settings())\nprint('unchanged')\n"


def _unchanged(body: str) -> None:
    run = subprocess.run([sys.executable, "-c", SETTINGS + body + AFTER], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip().endswith("unchanged"), run.stderr[-3000:]


def test_importing_the_library_leaves_logging_and_warnings_alone():
    _unchanged("import kvpolicy.compression.scorers, kvpolicy.evaluation.sweep, kvpolicy.models.loader, "
               "kvpolicy.report.render, kvpolicy.traces.pipeline, kvpolicy.training.trainer")


@pytest.mark.model
def test_loading_a_model_leaves_logging_and_warnings_alone():
    _unchanged("from kvpolicy.models.loader import load_model\n"
               "load_model('smollm2-135m')  # a fresh process: a real load")
