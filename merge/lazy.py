"""A module imported on its first use, for modules whose readers mostly never need it.

`evomerge status` and `evomerge report` read a run directory: they build the search config and
recipes (the method registry's declarations) but never a tensor, and importing torch was most
of their time. A module that names torch through `lazy("torch")` keeps its function bodies as
they were (`torch.isfinite(...)`) and pays for the import where a body first runs.

Each user imports the real modules under `if TYPE_CHECKING:` too, so type checkers and the
layering test (tests/test_layering.py, which reads import statements) still see the
dependency.
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
