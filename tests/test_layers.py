"""The layers' arrows point one way, the runtime installs without torch, generic code spells no model markup.

app (edge_app) -> convert / quant / edge_runtime -> bottom (edge_common, edge_llama, edge_models).
convert and quant never import each other; edge_runtime imports neither (bench/ is exempt: it
measures the converter and quantizer too); bottom packages import nothing above them, and
edge_common, the very bottom, imports no other package of ours.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("edge_app", "convert", "quant", "edge_runtime", "edge_common", "edge_llama", "edge_models")
UPPER = ("edge_app", "convert", "quant", "edge_runtime")
# package (or sub-package) -> packages it must never import, anywhere in its code (lazy imports included)
FORBIDDEN = {
    "convert": ("quant", "edge_runtime", "edge_app"),
    "quant": ("convert", "edge_runtime", "edge_app"),
    "edge_runtime": ("convert", "quant", "edge_app"),
    "edge_models": UPPER,
    "edge_llama": UPPER + ("edge_models",),
    "edge_common": UPPER + ("edge_models", "edge_llama"),
}
EXEMPT = ("edge_runtime/bench/",)
# Chat markup of a model family: special tokens and think tags belong to edge_models/<family>/.
MARKUP = re.compile(r"<\|[a-z_]+\|>|</?think>")
# The converter and quantizer are generic: no family's name in their code (docstrings may cite it).
FAMILY_NAME = re.compile(r"qwen", re.IGNORECASE)


def imported_packages(source: str, module: str) -> set[str]:
    """Top-level packages a module imports (absolute and relative, at module level or inside functions)."""
    found = set()
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(base[0])
            elif node.module:
                found.add(node.module.split(".")[0])
    return found & set(OURS)


def layer_violations(files: dict[str, str]) -> list[str]:
    """'path imports pkg' for every forbidden arrow among {relative path: source}."""
    out = []
    for rel, source in sorted(files.items()):
        if rel.startswith(EXEMPT):
            continue
        top = rel.split("/")[0]
        module = rel[:-3].replace("/", ".")
        for pkg in sorted(imported_packages(source, module) & set(FORBIDDEN.get(top, ()))):
            out.append(f"{rel} imports {pkg}")
    return out


def markup_literals(source: str, pattern: re.Pattern = MARKUP) -> list[str]:
    """String literals (docstrings aside) that match `pattern` (by default: a model family's chat markup)."""
    tree = ast.parse(source)
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs and pattern.search(n.value)]


def our_sources(*packages: str) -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
            for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))}


def test_checker_sees_a_wrong_arrow():
    """The checker itself: planted wrong arrows (absolute, relative-free lazy, from-import) are reported."""
    planted = {
        "quant/x.py": "def f():\n    from convert.pipeline import plan_output\n",
        "edge_runtime/y.py": "import quant.catalog\n",
        "edge_common/z.py": "from edge_models import chat_format\n",
        "edge_runtime/bench/w.py": "import quant\n",  # exempt
        "edge_runtime/ok.py": "from .errors import ModelFileError\nfrom edge_common.manifest import MANIFEST\n",
    }
    assert layer_violations(planted) == ["edge_common/z.py imports edge_models", "edge_runtime/y.py imports quant",
                                         "quant/x.py imports convert"]
    assert markup_literals('"""<think> in a docstring is fine"""\nEOT = "<|im_end|>"\n') == ["<|im_end|>"]


def test_arrows_point_one_way():
    assert layer_violations(our_sources(*OURS)) == []


def test_generic_code_spells_no_chat_markup():
    """Placeholder tokens, end-of-turn strings and think tags come from edge_models, not literals."""
    generic = {rel: src for rel, src in our_sources("convert", "quant", "edge_runtime", "edge_common").items()
               if not rel.startswith(EXEMPT)}
    found = {rel: lits for rel, src in generic.items() if (lits := markup_literals(src))}
    assert found == {}


def test_converter_and_quantizer_name_no_model_family():
    """Everything Qwen-specific the converter and quantizer need comes through edge_models' tables."""
    found = {rel: lits for rel, src in our_sources("convert", "quant", "edge_common").items()
             if (lits := markup_literals(src, FAMILY_NAME))}
    assert found == {}
    assert markup_literals('ARCH = "qwen3vl"\n', FAMILY_NAME) == ["qwen3vl"]  # the check can fail


@pytest.mark.parametrize("modules", [
    "edge_runtime, edge_runtime.chat, edge_runtime.engine, edge_runtime.cli, edge_runtime.server.app",
    "edge_models, edge_models.qwen3vl.arch, edge_models.qwen3vl.config",
])
def test_runtime_imports_without_torch_convert_or_quant(modules):
    """What a Pi installs: importing the runtime loads no torch, transformers, convert or quant."""
    code = (f"import sys; import {modules}; "
            "bad = sorted(m for m in ('torch', 'transformers', 'convert', 'quant', 'edge_app') if m in sys.modules); "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ---------------------------------------------------------------- one door to llama.cpp

# Where `llama_cpp` may be imported: the access layer, and test helpers that say why they need it.
LLAMA_DOOR = ("edge_llama/", "tests/support/")
SKIP_DIRS = {".venv", "venv", "build", "dist", ".git", "node_modules", "site"}


def llama_cpp_importers(root: Path) -> tuple[list[str], int]:
    """('path:line imports llama_cpp' for every .py under `root` outside LLAMA_DOOR, files scanned)."""
    found, scanned = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if SKIP_DIRS & set(rel.split("/")[:-1]) or rel.startswith(LLAMA_DOOR):
            continue
        scanned += 1
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), rel)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n.split(".")[0] == "llama_cpp" for n in names):
                found.append(f"{rel}:{node.lineno} imports llama_cpp")
    return found, scanned


def test_only_edge_llama_imports_llama_cpp(tmp_path):
    """edge_llama is the one door to llama.cpp: every tokenize, encode, decode, batch and sampler is
    wrapped there once, so no other module may load llama_cpp (lazily inside a function included)."""
    planted = tmp_path / "edge_runtime" / "sneaky.py"
    planted.parent.mkdir()
    lib = "llama_cpp"  # spelled apart, so a grep for the import finds only the real ones
    planted.write_text(f"import os\n\ndef f():\n    from {lib} import mtmd_cpp\n    import {lib}.llama_grammar\n")
    (tmp_path / "edge_llama").mkdir()
    (tmp_path / "edge_llama" / "door.py").write_text(f"import {lib}\n")
    (tmp_path / "edge_runtime" / "clean.py").write_text(f"import edge_llama\n{lib} = 1\n")
    assert llama_cpp_importers(tmp_path) == (["edge_runtime/sneaky.py:4 imports llama_cpp",
                                               "edge_runtime/sneaky.py:5 imports llama_cpp"], 2)
    offenders, scanned = llama_cpp_importers(ROOT)
    assert scanned > 100  # the runtime, quant, convert, bench, examples and tests were all read
    assert offenders == [], "go through edge_llama instead:\n" + "\n".join(offenders)
