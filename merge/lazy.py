"""A module imported on its first attribute read.

`evomerge status` and `report` build configs and recipes but never a tensor, and importing torch
was most of their time. Users also import the real module under `if TYPE_CHECKING:`, so type
checkers and tests/test_layering.py (which reads import statements) still see the dependency.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    """Stands for the module `name`: the first attribute read imports it."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str):
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        state = "imported" if self._module is not None else "not imported yet"
        return f"<lazy module {self._name!r} ({state})>"


def lazy(name: str) -> LazyModule:
    return LazyModule(name)
