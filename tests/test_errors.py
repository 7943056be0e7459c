"""One exception root: every refusal class of the library derives from EdgeError and keeps its other bases."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

from edge_common.errors import EdgeError

ROOT = Path(__file__).resolve().parents[1]
# Every top-level package of ours (a folder beside tests/ with an __init__.py): a new one is walked
# without anyone remembering to list it.
PACKAGES = tuple(sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests"))
# Modules that import optional extras at module level (the server needs fastapi, plot matplotlib).
OPTIONAL = {"edge_bench.plot"}


def our_exception_classes() -> dict[str, type]:
    found = {}
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        names = [pkg_name] + [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg_name + ".")]
        for name in names:
            if name in OPTIONAL or name.endswith("__main__"):
                continue
            module = importlib.import_module(name)
            for cls_name, cls in inspect.getmembers(module, inspect.isclass):
                if issubclass(cls, BaseException) and cls.__module__ == name:
                    found[f"{name}.{cls_name}"] = cls
    return found


def test_every_library_exception_is_an_edge_error():
    assert {"edge_llama", "edge_runtime", "convert", "quant", "edge_common", "edge_models"} <= set(PACKAGES)
    classes = our_exception_classes()
    assert len(classes) >= 15  # the walk found the packages' classes (a broken walk would pass vacuously)
    assert "edge_llama.errors.LlamaError" in classes  # the llama.cpp access layer is walked too
    outside = sorted(n for n, c in classes.items() if not issubclass(c, EdgeError))
    assert outside == []


def test_the_walk_reports_a_planted_exception_outside_the_root(monkeypatch):
    """The check can fail: a class planted in a walked module that derives from ValueError only."""
    import edge_llama.errors

    planted = type("PlantedError", (ValueError,), {"__module__": "edge_llama.errors"})
    monkeypatch.setattr(edge_llama.errors, "PlantedError", planted, raising=False)
    classes = our_exception_classes()
    assert [n for n, c in classes.items() if not issubclass(c, EdgeError)] == ["edge_llama.errors.PlantedError"]


@pytest.mark.parametrize("path, other_base", [
    ("quant.errors.QuantError", ValueError),
    ("edge_runtime.errors.ModelFileError", FileNotFoundError),
    ("edge_runtime.errors.ContextOverflowError", ValueError),
    ("edge_runtime.vision.images.ImageError", ValueError),
    ("edge_runtime.core.template.TemplateError", ValueError),
    ("edge_runtime.chat.grounding.GroundingError", ValueError),
    ("edge_models.errors.ModelConfigError", ValueError),
    ("edge_common.errors.OutputError", ValueError),
])
def test_specific_classes_keep_their_other_bases(path, other_base):
    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, EdgeError) and issubclass(cls, other_base)


def test_one_missing_model_file_class():
    """The runtime's public ModelFileError is edge_common's: one class for every layer that resolves model paths."""
    import edge_runtime
    from edge_common.errors import ModelFileError

    assert edge_runtime.ModelFileError is ModelFileError
