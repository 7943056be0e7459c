"""PEP 562 lazy exports: a package lists its public names without importing their modules.

`import edge_runtime` must not load llama.cpp, and `import edge_bench`
no model library, so each package maps names to modules and imports on first use.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping


def lazy_getattr(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level __getattr__ that imports `package.<exports[name]>` when `name` is first read."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        setattr(sys.modules[package], name, value)  # later reads skip this function
        return value

    return __getattr__
