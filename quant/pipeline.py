"""`edge-convert --quant q4_k_m` end to end: checkpoint -> f16 pair -> quantized pair + manifest.

The converter writes float files only; everything else goes through an f16
intermediate in a temporary folder inside OUT (same disk, so the final rename
is cheap), removed afterwards unless keep_f16. Free space for the
intermediate and the outputs is checked before anything is written. With an
imatrix ("auto" or a file) it is checked against the intermediate pair's
tensors and applied to both files; with report=True the quantized pair is
measured against the intermediate (quant.quality) and the numbers go into
manifest.json under "quality".
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import catalog
from .errors import QuantError

IMATRIX_FILE = "imatrix.gguf"
INTERMEDIATE = "f16"


@dataclass(frozen=True)
class QuantizeOptions:
    quant: str = "q4_k_m"
    mmproj_quant: str | None = None  # default: catalog.default_projector_type(quant)
    imatrix: str | Path | None = None  # None, "auto" or an imatrix file
    calibration: str | Path | None = None  # images + prompts.txt for imatrix "auto"
    keep_f16: bool = False
    report: bool = False
    overwrite: bool = False
    progress: bool = True
    name: str | None = None
    nthread: int = 0
    imatrix_samples: int | None = None  # cap on calibration samples for "auto"
    quality: Any = None  # quant.quality.QualityOptions for report=True (None: its defaults)


def needs_quant_pipeline(quant: str, mmproj_quant: str | None, imatrix: object = None, report: bool = False) -> bool:
    """False when the converter alone can do the job (float text and projector, nothing else asked)."""
    t = catalog.lookup(quant)
    m = catalog.lookup_projector(mmproj_quant or catalog.default_projector_type(quant))
    return not (t.is_float and m.is_float) or imatrix is not None or report


def check_disk(out_dir: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(out_dir).free
    if free < needed:
        raise QuantError(f"{out_dir}: needs {needed / 1e9:.2f} GB free for {what} but has {free / 1e9:.2f} GB; "
                         "free space or choose another directory with -o.")


def _log(progress: bool) -> Callable[[str], None]:
    import sys

    return (lambda msg: print(f"edge-convert: {msg}", file=sys.stderr)) if progress else (lambda msg: None)


def convert_quantized(model_dir: str | Path, out_dir: str | Path, options: QuantizeOptions) -> dict[str, Any]:
    """Write OUT/<name>-<quant>.gguf, OUT/mmproj-<name>-<mquant>.gguf and OUT/manifest.json; return the manifest."""
    from convert import __version__, convert_checkpoint
    from convert.arch import lookup as arch_lookup
    from convert.checkpoint import read_json
    from convert.manifest import MANIFEST, file_entry, read_manifest, write_manifest
    from convert.pipeline import model_stem, prepare_out_dir

    from . import estimate as est
    from . import imatrix as imx
    from .mmproj import MmprojQuantOptions, quantize_mmproj
    from .text import TextQuantOptions, quantize_text

    log = _log(options.progress)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    qt = catalog.lookup(options.quant)
    mq = catalog.lookup_projector(options.mmproj_quant or catalog.default_projector_type(qt.name))
    auto = str(options.imatrix).lower() == "auto" if options.imatrix is not None else False
    if options.calibration is not None and not auto:
        raise QuantError("--calibration is used to compute an importance matrix; add --imatrix auto.")
    if qt.needs_imatrix and options.imatrix is None:
        from .text import require_imatrix

        require_imatrix(qt.name, None)
    config = read_json(model_dir / "config.json", "config.json")
    spec = arch_lookup(config, str(model_dir / "config.json"))
    stem = model_stem(model_dir, options.name)
    outputs = {o.role: o for o in spec.outputs}
    text_name = outputs["text"].file_name(stem, catalog.canonical(qt.name))
    mm_name = outputs["mmproj"].file_name(stem, mq.name) if "mmproj" in outputs else None
    prepare_out_dir(out_dir)
    targets = [out_dir / n for n in (text_name, mm_name, MANIFEST) if n]
    if options.keep_f16:
        targets += [out_dir / outputs[r].file_name(stem, INTERMEDIATE) for r in outputs]
    existing = [str(p) for p in dict.fromkeys(targets) if p.exists()]
    if existing and not options.overwrite:
        raise QuantError(f"{existing[0]} already exists; pass --overwrite to replace it.")

    shapes = est.load_shapes(model_dir)
    plan = est.estimate(shapes, qt.name, mq.name, imatrix=options.imatrix is not None)
    f16 = est.estimate(shapes, INTERMEDIATE, INTERMEDIATE)
    check_disk(out_dir, f16.disk_bytes + plan.disk_bytes + (64 << 20),
               f"the f16 intermediate ({f16.disk_bytes / 1e9:.2f} GB) and the outputs ({plan.disk_bytes / 1e9:.2f} GB)")

    preloaded = imx.load(options.imatrix) if options.imatrix is not None and not auto else None  # fail early

    tmp = Path(tempfile.mkdtemp(prefix=".edge-convert-", dir=out_dir))
    try:
        log(f"converting to an f16 intermediate in {tmp}")
        convert_checkpoint(model_dir, tmp, INTERMEDIATE, mmproj_quant=INTERMEDIATE, overwrite=True,
                           progress=options.progress, name=stem)
        inter = read_manifest(tmp)
        pair = {"text": tmp / inter["text"]["path"]}
        if "mmproj" in inter:
            # Through our own writer at f16: the reference keeps every rule clip needs (F32 position embeddings).
            pair["mmproj"] = tmp / f"ref-{inter['mmproj']['path']}"
            quantize_mmproj(tmp / inter["mmproj"]["path"], pair["mmproj"],
                            MmprojQuantOptions(INTERMEDIATE, progress=False, overwrite=True))

        im = None
        im_info: dict[str, Any] | None = None
        if auto:
            log("computing an importance matrix with the reference model"
                + (f" over {options.calibration}" if options.calibration else " over built-in images and prompts"))
            im = imx.compute_imatrix(model_dir, options.calibration,
                                     imx.ImatrixOptions(max_samples=options.imatrix_samples, progress=options.progress))
            imx.save(im, out_dir / IMATRIX_FILE)
        else:
            im = preloaded
        if im is not None:
            cov = imx.check(im, pair)
            im_info = {"path": str(im.path), "datasets": list(im.datasets), "chunks": im.chunk_count,
                       "coverage": {r: f"{len(c.covered)}/{len(c.covered) + len(c.missing)}" for r, c in cov.items()}}

        reports: dict[str, Any] = {}
        text_out = out_dir / text_name
        if qt.name == INTERMEDIATE:
            shutil.copyfile(pair["text"], text_out)
        elif qt.is_float:
            convert_checkpoint(model_dir, tmp / "float", qt.name, mmproj_quant=INTERMEDIATE, overwrite=True,
                               progress=options.progress, name=stem)
            os.replace(tmp / "float" / text_name, text_out)
        else:
            log(f"quantizing the text model to {qt.name}")
            reports["text"] = quantize_text(pair["text"], text_out, TextQuantOptions(
                qt.name, im, options.nthread, progress=options.progress, overwrite=True))
        mm_out = out_dir / mm_name if mm_name else None
        if mm_out is not None:
            log(f"quantizing the projector to {mq.name}")
            reports["mmproj"] = quantize_mmproj(pair["mmproj"], mm_out, MmprojQuantOptions(
                mq.name, im, options.nthread, progress=options.progress, overwrite=True))

        manifest: dict[str, Any] = {
            "converter_version": inter.get("converter_version", __version__),
            "architecture": inter.get("architecture", spec.name),
            "source": inter.get("source"),
            "text": file_entry(out_dir, text_out, qt.name),
        }
        if mm_out is not None:
            manifest["mmproj"] = file_entry(out_dir, mm_out, mq.name)
        manifest["quantization"] = {
            "intermediate": INTERMEDIATE,
            "estimate": plan.to_dict(),
            **{role: r.to_dict() for role, r in reports.items()},
        }
        if im_info is not None:
            manifest["imatrix"] = im_info
        if options.report:
            from .quality import QualityOptions, evaluate, format_table

            log("measuring quality against the f16 intermediate")
            q = evaluate((pair["text"], pair.get("mmproj")), (text_out, mm_out),
                         options.quality or QualityOptions(threads=options.nthread or None))
            manifest["quality"] = {**q.to_dict(), "ref": f"{INTERMEDIATE} intermediate", "test": text_out.name}
            log("\n" + format_table(q))
        if options.keep_f16:
            finals = {text_out, mm_out}
            for role, path in pair.items():
                dest = out_dir / outputs[role].file_name(stem, INTERMEDIATE)
                if dest in finals:  # the output is itself the f16 file
                    continue
                os.replace(path, dest)
                manifest.setdefault("intermediate", {})[role] = file_entry(out_dir, dest, INTERMEDIATE)
        write_manifest(out_dir, manifest)
        return read_manifest(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
