"""Lazy re-exports: a package names its public API without importing it, so that light uses (`kvp --help`,
reading the model registry) never import torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def check_reference(reference: str, what: str) -> None:
    """Raise a ValueError ("WHAT, not 'REFERENCE'") unless `reference` names an attribute as "module:attribute"."""
    module, _, attribute = reference.partition(":")
    if not module or not attribute:
        raise ValueError(f"{what}, not '{reference}'")


def import_reference(reference: str) -> Any:
    """The attribute a "module:attribute" reference names (its module imported on first use)."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def lazy_exports(package: str, homes: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package` that imports each name of `homes` (name -> the module defining
    it) on first use."""

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        return getattr(importlib.import_module(homes[name]), name)

    return __getattr__
