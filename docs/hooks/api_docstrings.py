"""MkDocs hook: the API reference may not show an object without a docstring, nor miss an export.

mkdocstrings leaves an object without a docstring out of the page (`show_if_no_docstring`
is false), so a forgotten docstring would make a public function vanish from the reference
without a word. This hook walks what each `::: identifier` block renders, with the same
rule (public means no leading underscore, members defined in the object itself, plain
attributes and dataclass fields excepted: the class docstring speaks for them) and logs a
warning per object without a docstring; `mkdocs build --strict` turns it into a failure.
It also warns when a name of a package's `__all__` (the packages listed under
`extra: api_complete:` in mkdocs.yml) appears in no `:::` block, so a new export cannot be
left out of the reference.

A block may name an object by its public path (`::: edge_runtime.VisionChat`) even when the
package exports it lazily (PEP 562 `__getattr__`, which griffe cannot follow): the hook asks
Python where the object is defined and points the block there, so the pages survive a move
of the defining module as long as the export still works.
"""
from __future__ import annotations

import importlib
import logging
import re
import sys
from pathlib import Path

import griffe

log = logging.getLogger("mkdocs.hooks.api_docstrings")
BLOCK = re.compile(r"^::: *([A-Za-z_][\w.]*) *$", re.MULTILINE)
_loader: griffe.GriffeLoader | None = None
_shown: set[str] = set()


def on_config(config):
    """A fresh loader per build (mkdocs serve rebuilds), reading the sources in the repository."""
    global _loader
    root = str(Path(config.config_file_path).resolve().parent)
    if root not in sys.path:
        sys.path.insert(0, root)  # __all__ of this checkout, not of an installed copy
    _loader = griffe.GriffeLoader(search_paths=[root])
    _shown.clear()
    return config


def _lookup(identifier: str) -> griffe.Object:
    package = identifier.split(".")[0]
    if package not in _loader.modules_collection.members:
        _loader.load(package)
    obj = _loader.modules_collection.get_member(identifier)
    if not obj.is_alias:
        return obj
    target = obj.target_path.split(".")[0]  # a re-export from another of our packages: load that one too
    if target not in _loader.modules_collection.members:
        _loader.load(target)
    return obj.final_target


def _shown_members(obj: griffe.Object):
    """The object and the public members mkdocstrings renders with it, recursively."""
    yield obj
    if not (obj.is_class or obj.is_module):
        return
    for name, member in obj.members.items():
        if name.startswith("_") or member.is_alias:
            continue
        if member.is_attribute and "property" not in member.labels:
            continue
        yield from _shown_members(member)


def _defining_path(identifier: str) -> str:
    """Where an object reached by import is defined: `edge_runtime.VisionChat` -> `edge_runtime.chat.VisionChat`."""
    parts = identifier.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return f"{obj.__module__}.{obj.__qualname__}"
    raise ImportError(f"no module of {identifier} imports")


def _checked(identifier: str, page: str) -> str:
    """The identifier mkdocstrings should collect, after warning for what it would show undocumented."""
    _shown.add(identifier)
    try:
        obj = _lookup(identifier)
    except (KeyError, griffe.AliasResolutionError):
        try:
            identifier = _defining_path(identifier)
            obj = _lookup(identifier)
        except (KeyError, ImportError, AttributeError, griffe.AliasResolutionError) as exc:
            log.warning("%s: cannot find %s for the API reference (%s); fix the ::: line", page, identifier, exc)
            return identifier
    for item in _shown_members(obj):
        if not (item.docstring and item.docstring.value.strip()):
            where = f"{item.relative_filepath}:{item.lineno}" if item.lineno else str(item.relative_filepath)
            log.warning("%s shows %s (%s) without a docstring: write one (why, not what)", page, item.path, where)
    return identifier


def on_page_markdown(markdown, page, config, files):
    """Point every `:::` block at its object's definition and check what it shows."""
    return BLOCK.sub(lambda m: "::: " + _checked(m.group(1), page.file.src_path), markdown)


def on_post_build(config):
    """Warn for every export of an `api_complete` package that no page shows."""
    for package in config.extra.get("api_complete", []):
        exported = getattr(importlib.import_module(package), "__all__", [])
        shown = {i.rsplit(".", 1)[-1] for i in _shown if i.split(".")[0] == package}
        for name in sorted(set(exported) - shown):
            log.warning("%s.%s is exported (__all__) but no API page shows it: add a ::: line", package, name)
