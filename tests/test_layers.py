"""The layers' arrows point one way, the runtime installs without torch, generic code spells no model markup.

app (edge_app, edge_bench) -> convert / quant / edge_runtime -> bottom (edge_common, edge_llama, edge_models).
convert and quant never import each other; edge_runtime imports neither (nothing in it is exempt:
edge_bench, which measures the converter and quantizer too, is an app package of its own); the two
app packages never import each other; bottom packages import nothing above them, and edge_common,
the very bottom, imports no other package of ours.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("edge_app", "edge_bench", "convert", "quant", "edge_runtime", "edge_common", "edge_llama", "edge_models")
APPS = ("edge_app", "edge_bench")
UPPER = APPS + ("convert", "quant", "edge_runtime")
# package (or sub-package) -> packages it must never import, anywhere in its code (lazy imports included)
FORBIDDEN = {
    "edge_app": ("edge_bench",),
    "edge_bench": ("edge_app",),
    "convert": ("quant", "edge_runtime") + APPS,
    "quant": ("convert", "edge_runtime") + APPS,
    "edge_runtime": ("convert", "quant") + APPS,
    "edge_models": UPPER,
    "edge_llama": UPPER + ("edge_models",),
    "edge_common": UPPER + ("edge_models", "edge_llama"),
}
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
    """{path relative to ROOT: source} of every module in `packages`; a package with no file fails
    the check that asked (a moved or misspelt package would otherwise pass on nothing)."""
    found = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
             for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))}
    empty = [pkg for pkg in packages if not any(rel.startswith(pkg + "/") for rel in found)]
    assert not empty, f"no Python file found in {empty} under {ROOT}: the check would pass on nothing"
    return found


def test_checker_sees_a_wrong_arrow():
    """The checker itself: planted wrong arrows (absolute, relative-free lazy, from-import) are reported."""
    planted = {
        "quant/x.py": "def f():\n    from convert.pipeline import plan_output\n",
        "edge_runtime/y.py": "import quant.catalog\n",
        "edge_common/z.py": "from edge_models import chat_format\n",
        "edge_runtime/bench/w.py": "import quant\n",  # no exemption inside edge_runtime any more
        "edge_bench/v.py": "import quant.catalog\nfrom edge_runtime import VisionChat\n",  # an app may
        "edge_runtime/u.py": "from edge_bench.peak import main\n",
        "edge_runtime/ok.py": "from .errors import ModelFileError\nfrom edge_common.manifest import MANIFEST\n",
    }
    assert layer_violations(planted) == ["edge_common/z.py imports edge_models", "edge_runtime/bench/w.py imports quant",
                                         "edge_runtime/u.py imports edge_bench", "edge_runtime/y.py imports quant",
                                         "quant/x.py imports convert"]
    assert markup_literals('"""<think> in a docstring is fine"""\nEOT = "<|im_end|>"\n') == ["<|im_end|>"]


def test_arrows_point_one_way():
    sources = our_sources(*OURS)
    assert {rel.split("/")[0] for rel in sources} == set(OURS)  # every package was scanned
    assert layer_violations(sources) == []


def test_generic_code_spells_no_chat_markup():
    """Placeholder tokens, end-of-turn strings and think tags come from edge_models, not literals."""
    generic = our_sources("convert", "quant", "edge_runtime", "edge_common")
    found = {rel: lits for rel, src in generic.items() if (lits := markup_literals(src))}
    assert found == {}


def test_converter_and_quantizer_name_no_model_family():
    """Everything Qwen-specific the converter and quantizer need comes through edge_models' tables."""
    found = {rel: lits for rel, src in our_sources("convert", "quant", "edge_common").items()
             if (lits := markup_literals(src, FAMILY_NAME))}
    assert found == {}
    assert markup_literals('ARCH = "qwen3vl"\n', FAMILY_NAME) == ["qwen3vl"]  # the check can fail


def plant_tree(root: Path, extra: dict[str, str]) -> None:
    """A stand-in repository: an empty __init__.py per package of ours, plus `extra` files."""
    for pkg in OURS:
        (root / pkg).mkdir(parents=True, exist_ok=True)
        (root / pkg / "__init__.py").write_text("")
    for rel, source in extra.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(source)


# each source check above -> a file that breaks its rule (and the words its report must name)
PLANTED = {
    test_arrows_point_one_way: ("quant/bad_arrow.py", "def f():\n    from convert.pipeline import plan_output\n",
                                "quant/bad_arrow.py imports convert"),
    test_generic_code_spells_no_chat_markup: ("edge_runtime/eot.py", 'EOT = "<|im_end|>"\n', "<|im_end|>"),
    test_converter_and_quantizer_name_no_model_family: ("convert/family.py", 'ARCH = "qwen3vl"\n', "qwen3vl"),
}


@pytest.mark.parametrize("check", list(PLANTED), ids=lambda f: f.__name__)
def test_each_source_check_fails_on_a_planted_file_and_on_no_files(check, tmp_path, monkeypatch):
    """The checks above, run as they are on a temporary tree: clean, it passes; with one violating
    file, it fails naming it; with a package folder empty, it fails rather than pass on nothing."""
    rel, source, named = PLANTED[check]
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / "clean")
    plant_tree(tmp_path / "clean", {})
    check()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / "planted")
    plant_tree(tmp_path / "planted", {rel: source})
    with pytest.raises(AssertionError) as caught:
        check()
    assert named in str(caught.value)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AssertionError, match="no Python file found"):
        check()


@pytest.mark.torch  # its planted module imports torch
def test_the_torch_free_import_check_fails_on_a_module_that_loads_torch_or_convert():
    """The subprocess check below reports what the imports drag in (here loaded on purpose)."""
    with pytest.raises(AssertionError, match="torch"):
        test_runtime_imports_without_torch_convert_or_quant("edge_models, torch")
    with pytest.raises(AssertionError, match="convert"):
        test_runtime_imports_without_torch_convert_or_quant("edge_models, convert")


@pytest.mark.parametrize("modules", [
    "edge_runtime, edge_runtime.chat.chat, edge_runtime.core.engine, edge_runtime.cli.cli, edge_runtime.server.app",
    "edge_models, edge_models.qwen3vl.arch, edge_models.qwen3vl.config",
])
def test_runtime_imports_without_torch_convert_or_quant(modules):
    """What a Pi installs: importing the runtime loads no torch, transformers, convert or quant."""
    code = (f"import sys; import {modules}; "
            "bad = sorted(m for m in ('torch', 'transformers', 'convert', 'quant', 'edge_app') if m in sys.modules); "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def module_imports(files: dict[str, str]) -> dict[str, set[str]]:
    """{module: modules of ours it imports} among {relative path: source}; `from . import x` names x only."""
    names = {rel[:-3].replace("/", ".").removesuffix(".__init__"): rel for rel in files}
    graph = {}
    for module, rel in names.items():
        package = module if rel.endswith("__init__.py") else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(files[rel])):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                subs = {f"{base}.{a.name}" for a in node.names} & names.keys()
                found |= subs | ({base} if len(subs) < len(node.names) else set())
        graph[module] = (found & names.keys()) - {module}
    return graph


def import_cycles(files: dict[str, str]) -> list[list[str]]:
    """Groups of modules that import each other, directly or around a circle (lazy imports count)."""
    graph = module_imports(files)
    reach = {m: set() for m in graph}
    for start in graph:
        todo = list(graph[start])
        while todo:
            m = todo.pop()
            if m not in reach[start]:
                reach[start].add(m)
                todo += graph[m]
    groups = {frozenset(m for m in graph if m in reach[start] and start in reach[m]) | {start}
              for start in graph if start in reach[start]}
    return sorted(sorted(g) for g in groups)


def test_no_module_imports_itself_around_a_circle():
    """A circle (edge_llama.amx <-> params once) only works while one side imports lazily; none is left."""
    planted = {
        "edge_llama/__init__.py": "from .a import A\n",
        "edge_llama/a.py": "def f():\n    from . import b\n",
        "edge_llama/b.py": "from .a import f\nfrom edge_llama import A\n",
        "edge_llama/c.py": "from . import a\n",
    }
    assert import_cycles(planted) == [["edge_llama", "edge_llama.a", "edge_llama.b"]]
    sources = our_sources(*OURS)
    assert len(module_imports(sources)) == len(sources) > 100
    assert import_cycles(sources) == []


FAMILY_PACKAGES = tuple(sorted(p.parent.name for p in (ROOT / "edge_models").glob("*/__init__.py")))
SCRIPTS = ("benchmarks", "examples")


def family_imports(files: dict[str, str], families: tuple[str, ...] = FAMILY_PACKAGES) -> list[str]:
    """'path imports edge_models.<family>' for code outside edge_models that reaches a family's package
    (absolute imports, `from edge_models import <family>`, lazy ones included)."""
    out = []
    for rel, source in sorted(files.items()):
        if rel.startswith("edge_models/"):
            continue
        names = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        hit = sorted({".".join(n.split(".")[:2]) for n in names
                      if n.split(".")[0] == "edge_models" and n.count(".") and n.split(".")[1] in families})
        out += [f"{rel} imports {h}" for h in hit]
    return out


def test_generic_code_reaches_model_families_through_the_registry():
    """Outside edge_models (tests aside) a family's facts come from edge_models' FamilySpec registry, looked up
    by architecture; importing edge_models.qwen3vl would make a second family an edit of generic code."""
    planted = {
        "edge_runtime/a.py": "from edge_models.qwen3vl import vision as qwen\n",
        "quant/b.py": "def f():\n    import edge_models.qwen3vl.vision\n",
        "edge_bench/c.py": "from edge_models import qwen3vl, family_for_gguf\n",
        "edge_app/d.py": "from edge_models import family_for_hf\nfrom edge_models.spec import FamilySpec\n",
        "edge_models/e.py": "from .qwen3vl.family import FAMILY\nfrom edge_models.qwen3vl import arch\n",
    }
    assert family_imports(planted, ("qwen3vl",)) == [
        "edge_bench/c.py imports edge_models.qwen3vl", "edge_runtime/a.py imports edge_models.qwen3vl",
        "quant/b.py imports edge_models.qwen3vl"]
    assert "qwen3vl" in FAMILY_PACKAGES
    sources = {rel: src for rel, src in our_sources(*OURS, *SCRIPTS).items() if not rel.startswith("edge_models/")}
    assert {rel.split("/")[0] for rel in sources} == set(OURS + SCRIPTS) - {"edge_models"}  # all scanned
    assert family_imports(sources) == []


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


# ---------------------------------------------------------------- rooms inside edge_runtime

# Top to bottom, as docs/architecture.md draws them: a room imports only rooms below it.
RUNTIME_ROOMS = ("cli", "server", "chat", "core", "vision")


def room_violations(files: dict[str, str]) -> list[str]:
    """'path imports edge_runtime.<room>' for every import of a room above (or beside, for an unknown
    room) the importing module's own, among {relative path: source} under edge_runtime/."""
    out = []
    for rel, source in sorted(files.items()):
        parts = rel.split("/")
        if parts[0] != "edge_runtime" or len(parts) < 3:
            continue  # the package's own __init__ and errors are shared by every room
        room = parts[1]
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.level:
                names = [".".join(parts[:-node.level] + ([node.module] if node.module else []))]
                names = [n.replace("/", ".") for n in names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                bits = name.split(".")
                if bits[0] != "edge_runtime" or len(bits) < 2 or bits[1] in (room, "errors"):
                    continue
                if bits[1] not in RUNTIME_ROOMS or room not in RUNTIME_ROOMS or \
                        RUNTIME_ROOMS.index(bits[1]) < RUNTIME_ROOMS.index(room):
                    out.append(f"{rel} imports edge_runtime.{bits[1]}")
    return sorted(set(out))


def test_runtime_rooms_import_downwards_only():
    """cli -> server -> chat -> core -> vision: the engine never reaches up into conversations, the
    vision room is usable alone (budgets, images, video) and a new room must be placed in the order."""
    planted = {
        "edge_runtime/core/a.py": "from edge_runtime.chat.template import ChatTemplate\n",
        "edge_runtime/vision/b.py": "def f():\n    from ..core.prompt import Prompt\n",
        "edge_runtime/chat/c.py": "from edge_runtime.core.engine import Engine\nfrom edge_runtime.errors import DecodeError\n",
        "edge_runtime/extra/d.py": "from edge_runtime.vision.images import load\n",
        "edge_runtime/server/e.py": "from edge_runtime.cli.cli import main\n",
    }
    assert room_violations(planted) == [
        "edge_runtime/core/a.py imports edge_runtime.chat", "edge_runtime/extra/d.py imports edge_runtime.vision",
        "edge_runtime/server/e.py imports edge_runtime.cli", "edge_runtime/vision/b.py imports edge_runtime.core"]
    sources = {rel: src for rel, src in our_sources("edge_runtime").items() if rel.count("/") >= 2}
    assert {rel.split("/")[1] for rel in sources} == set(RUNTIME_ROOMS)  # every room scanned
    assert room_violations(sources) == []
