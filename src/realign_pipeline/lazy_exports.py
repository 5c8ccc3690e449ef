"""A package's names that load on first use (PEP 562 module ``__getattr__``), so that importing the package,
as ``realign --help`` does, loads neither torch nor transformers."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``, whose public ``name`` lives in the submodule
    ``exports[name]`` (relative, e.g. ``".factory"``) and is imported from there on first access."""
    names = sorted(exports)

    def module_getattr(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name], package), name)

    def module_dir() -> list[str]:
        return names

    return module_getattr, module_dir
