"""The repository carries code: what git tracks stays small. Raw results are committed packed (`results.jsonl.gz`,
`kvp results pack`), report figures as palette PNGs (kvpolicy/report/figures.py), HTML reports not at all (`kvp
report` rebuilds them) and of the study's policies only the one a stage still to run reads (`kvp experiment`
rebuilds the others: docs/RESULTS.md, section 8), so a plain results file, a report page, an RGBA figure or a
policy added by mistake shows here."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# the tracked tree was 122 MB with the studies' plain results and HTML reports, 33 MB after packing them, 14.5 MB
# after writing figures as palette PNGs (10.5 -> 2.8 MB) and keeping one study policy of five (12.5 -> 1.7 MB)
LIMIT_MB = 25
FILE_LIMIT_MB = 4  # the largest committed files are the studies' packed results (2 MB each)


def tracked_sizes() -> dict[str, int]:
    """Size on disk of every file git tracks here (a tracked file deleted in the work tree counts 0)."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("git is not installed")
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != ROOT.resolve():
        pytest.skip("not a git checkout of kvpolicy")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    paths = [ROOT / name for name in names.decode().split("\0") if name]
    return {str(p.relative_to(ROOT)): p.stat().st_size if p.is_file() else 0 for p in paths}


def test_the_tracked_tree_stays_small():
    sizes = tracked_sizes()
    by_size = sorted(sizes.items(), key=lambda item: -item[1])
    largest = ", ".join(f"{name} ({size / 1e6:.1f} MB)" for name, size in by_size[:5])
    total = sum(sizes.values())
    assert total < LIMIT_MB * 1e6, f"the tracked files hold {total / 1e6:.1f} MB; the largest: {largest}"
    big = [name for name, size in sizes.items() if size > FILE_LIMIT_MB * 1e6]
    assert not big, f"files over {FILE_LIMIT_MB} MB are tracked: {big}; pack results (`kvp results pack`), keep " \
        "what a command rebuilds out of git"
