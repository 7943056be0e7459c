"""The files a benchmark run needs: one text GGUF per quant type, one projector.

From a converter output directory (its manifest.json), types other than the
converted one are derived with the `quant` package from the float files, into
a cache directory, once. `--synthetic 2b` first builds the shape-faithful
random checkpoint and converts it to f16 in that cache (minutes, once), so a
bare machine can produce real speed and memory numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edge_common import manifest
from edge_common.errors import EdgeError, ModelFileError

FLOAT_TYPES = ("f32", "f16", "bf16")
SYNTHETIC_SIZES = ("tiny", "2b")
Log = Callable[[str], None]


class BenchSetupError(EdgeError, RuntimeError):
    """The model files for a benchmark cannot be found or made."""


@dataclass
class ModelSet:
    """Paths per role: text model per quant name, projector per type, and the HF checkpoint."""

    name: str
    text: dict[str, Path] = field(default_factory=dict)
    mmproj: dict[str, Path] = field(default_factory=dict)
    hf_dir: Path | None = None
    reference: tuple[Path, Path] | None = None  # the float (text, projector) pair, for accuracy

    def text_path(self, quant: str) -> Path:
        return self.text[quant]

    def mmproj_path(self, quant: str) -> Path:
        return self.mmproj[quant]


def read_manifest(out_dir: Path) -> dict:
    try:
        return manifest.read_manifest(out_dir, need_mmproj=True)
    except ModelFileError as exc:
        raise BenchSetupError(f"{exc}: pass an edge-convert output directory (text model and projector) "
                              "or --synthetic 2b") from None


def is_fresh(derived: Path, source: Path) -> bool:
    """A derived file is reused when it is newer than what it was made from."""
    return derived.is_file() and derived.stat().st_mtime >= source.stat().st_mtime


def _derive(source: Path, dst: Path, what: str, log: Log, quantize: Callable[[], object]) -> Path:
    """Run `quantize` (writing dst) unless dst is already newer than source."""
    if not is_fresh(dst, source):
        log(f"edge-bench: deriving the {what} {dst} (once)")
        dst.parent.mkdir(parents=True, exist_ok=True)
        quantize()
    return dst


def derive_text(source: Path, dst: Path, quant: str, threads: int, progress: bool, log: Log = print) -> Path:
    from quant.text import TextQuantOptions, quantize_text

    options = TextQuantOptions(quant, nthread=threads, progress=progress, overwrite=True)
    return _derive(source, dst, f"{quant} text model", log, lambda: quantize_text(source, dst, options))


def derive_mmproj(source: Path, dst: Path, quant: str, threads: int, progress: bool, log: Log = print) -> Path:
    from quant.mmproj import MmprojQuantOptions, quantize_mmproj

    options = MmprojQuantOptions(quant, nthread=threads, progress=progress, overwrite=True)
    return _derive(source, dst, f"{quant} projector", log, lambda: quantize_mmproj(source, dst, options))


def prepare_dir(out_dir: str | Path, quants: tuple[str, ...], mmproj_quant: str, *, cache_dir: str | Path,
                threads: int = 0, progress: bool = True, log: Log = print,
                extra_mmproj: tuple[str, ...] = ()) -> ModelSet:
    """The converted pair of `out_dir`, plus each other requested type derived into `cache_dir`.

    `extra_mmproj`: more projector types to derive where the projector is float (the projector-type
    comparison of `--images`); skipped otherwise."""
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    manifest = read_manifest(out_dir)
    text_src, text_type = out_dir / manifest["text"]["path"], manifest["text"]["type"]
    proj_src, proj_type = out_dir / manifest["mmproj"]["path"], manifest["mmproj"]["type"]
    stem = text_src.name.removesuffix(".gguf").removesuffix(f"-{text_type}")
    source = manifest.get("source", {}).get("path")
    models = ModelSet(stem, hf_dir=Path(source) if source and Path(source, "config.json").is_file() else None)
    if text_type in FLOAT_TYPES and proj_type in FLOAT_TYPES:
        models.reference = (text_src, proj_src)
    for q in quants:
        if q == text_type:
            models.text[q] = text_src
            continue
        _require_float(text_type, text_src, q)
        models.text[q] = derive_text(text_src, cache_dir / f"{stem}-{q}.gguf", q, threads, progress, log)
    extra = tuple(q for q in extra_mmproj if q != mmproj_quant) if proj_type in FLOAT_TYPES else ()
    for q in (mmproj_quant, *extra):
        if q == proj_type:
            models.mmproj[q] = proj_src
            continue
        _require_float(proj_type, proj_src, q)
        models.mmproj[q] = derive_mmproj(proj_src, cache_dir / f"mmproj-{stem}-{q}.gguf", q, threads, progress, log)
    return models


def _require_float(have: str, path: Path, want: str) -> None:
    if have not in FLOAT_TYPES:
        raise BenchSetupError(f"{path} is {have}: {want} can only be derived from a float conversion; "
                              "run edge-convert with --quant f16 and bench that directory")


def synthetic_paths(size: str, cache_dir: str | Path) -> tuple[Path, Path]:
    """(checkpoint directory, f16 conversion directory) of a synthetic model in the cache."""
    root = Path(cache_dir)
    return root / f"qwen3-vl-{size}", root / f"qwen3-vl-{size}-gguf"


def ensure_synthetic(size: str, cache_dir: str | Path, *, progress: bool = True, log: Log = print) -> Path:
    """Build and convert the synthetic checkpoint unless the cache has it; returns the f16 directory."""
    if size not in SYNTHETIC_SIZES:
        raise BenchSetupError(f"unknown synthetic size {size!r}; choose one of {', '.join(SYNTHETIC_SIZES)}")
    ckpt, gguf_dir = synthetic_paths(size, cache_dir)
    try:
        from convert import convert_checkpoint
        from edge_models import family_for_gguf

        synthetic = family_for_gguf().module("synthetic")  # the default family: Qwen3-VL's shapes
    except ImportError as exc:
        raise BenchSetupError(f"--synthetic needs the convert extra (pip install 'qwen3-vl-edge[convert]'): {exc}")
    if not (ckpt / "config.json").is_file():  # config.json is written last: its presence marks completion
        log(f"edge-bench: building the {size} synthetic checkpoint in {ckpt} (once)")
        synthetic.build_checkpoint(ckpt, synthetic.SyntheticSpec(size=size))
    if not (gguf_dir / manifest.MANIFEST).is_file():
        log(f"edge-bench: converting it to f16 in {gguf_dir} (once)")
        convert_checkpoint(ckpt, gguf_dir, "f16", progress=progress, overwrite=True)
    return gguf_dir


def prepare_synthetic(size: str, quants: tuple[str, ...], mmproj_quant: str, *, cache_dir: str | Path,
                      threads: int = 0, progress: bool = True, log: Log = print,
                      extra_mmproj: tuple[str, ...] = ()) -> ModelSet:
    gguf_dir = ensure_synthetic(size, cache_dir, progress=progress, log=log)
    models = prepare_dir(gguf_dir, quants, mmproj_quant, cache_dir=gguf_dir, threads=threads, progress=progress,
                         log=log, extra_mmproj=extra_mmproj)
    models.hf_dir = synthetic_paths(size, cache_dir)[0]
    return models
