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
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from convert import __version__, convert_checkpoint
from convert.checkpoint import read_json
from convert.pipeline import model_stem, spec_for
from convert.shapes import model_shapes
from edge_common.disk import check_free_space, check_overwrite, prepare_out_dir
from edge_common.manifest import MANIFEST, file_entry, read_manifest, write_manifest
from quant import catalog
from quant import estimate as est
from quant import imatrix as imx
from quant.errors import QuantError
from quant.imatrix_check import check as check_imatrix
from quant.imatrix_compute import ImatrixOptions, compute_imatrix
from quant.mmproj import MmprojQuantOptions, quantize_mmproj
from quant.text import TextQuantOptions, quantize_text, require_imatrix

IMATRIX_FILE = "imatrix.gguf"
INTERMEDIATE = "f16"


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything `edge-convert --quant` decides, fixed before a byte is written.

    Frozen so that the free-space plan, the intermediate, the quantizers and the manifest all
    see the same choices; the CLI fills it from its flags.
    """

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

    @property
    def auto_imatrix(self) -> bool:
        """True when the importance matrix is computed here ("auto") rather than read from a file."""
        return self.imatrix is not None and str(self.imatrix).lower() == "auto"


def needs_quant_pipeline(quant: str, mmproj_quant: str | None, imatrix: object = None, report: bool = False) -> bool:
    """False when the converter alone can do the job (float text and projector, nothing else asked)."""
    t = catalog.lookup(quant)
    m = catalog.lookup_projector(mmproj_quant or catalog.default_projector_type(quant))
    return not (t.is_float and m.is_float) or imatrix is not None or report


def _log(progress: bool) -> Callable[[str], None]:
    return (lambda msg: print(f"edge-convert: {msg}", file=sys.stderr)) if progress else (lambda msg: None)


@dataclass(frozen=True)
class _Plan:
    """What a run will write, decided (and checked) before any work starts."""

    text_type: catalog.QuantType
    mmproj_type: catalog.QuantType
    stem: str
    names: dict[str, str]  # role -> final file name
    f16_names: dict[str, str]  # role -> f16 file name (for keep_f16)
    estimate: est.Estimate


def _plan(model_dir: Path, out_dir: Path, options: QuantizeOptions) -> _Plan:
    """Types, file names and the size estimate; refuse bad options, existing outputs and a full disk."""
    qt = catalog.lookup(options.quant)
    mq = catalog.lookup_projector(options.mmproj_quant or catalog.default_projector_type(qt.name))
    if options.calibration is not None and not options.auto_imatrix:
        raise QuantError("--calibration is used to compute an importance matrix; add --imatrix auto.")
    if qt.needs_imatrix and options.imatrix is None:
        require_imatrix(qt.name, None)
    config = read_json(model_dir / "config.json", "config.json")
    spec = spec_for(config, str(model_dir / "config.json"))
    stem = model_stem(model_dir, options.name)
    outputs = {o.role: o for o in spec.outputs}
    names = {"text": outputs["text"].file_name(stem, catalog.canonical(qt.name))}
    if "mmproj" in outputs:
        names["mmproj"] = outputs["mmproj"].file_name(stem, mq.name)
    f16_names = {r: o.file_name(stem, INTERMEDIATE) for r, o in outputs.items()}
    prepare_out_dir(out_dir, QuantError)
    targets = [out_dir / n for n in names.values()] + [out_dir / MANIFEST]
    if options.keep_f16:
        targets += [out_dir / n for n in f16_names.values()]
    check_overwrite(targets, options.overwrite, QuantError)
    shapes = model_shapes(model_dir)
    plan = est.estimate(shapes, qt.name, mq.name, imatrix=options.imatrix is not None)
    f16 = est.estimate(shapes, INTERMEDIATE, INTERMEDIATE)
    check_free_space(out_dir, f16.disk_bytes + plan.disk_bytes + (64 << 20),
               f"the f16 intermediate ({f16.disk_bytes / 1e9:.2f} GB) and the outputs ({plan.disk_bytes / 1e9:.2f} GB)",
                     QuantError)
    return _Plan(qt, mq, stem, names, f16_names, plan)


def _convert_intermediate(model_dir: Path, tmp: Path, stem: str,
                          progress: bool) -> tuple[dict[str, Any], dict[str, Path]]:
    """The f16 pair in `tmp`; the projector rewritten by our quantizer so it keeps every rule clip needs."""
    convert_checkpoint(model_dir, tmp, INTERMEDIATE, mmproj_quant=INTERMEDIATE, overwrite=True,
                       progress=progress, name=stem)
    inter = read_manifest(tmp)
    pair = {"text": tmp / inter["text"]["path"]}
    if "mmproj" in inter:
        # Through our own writer at f16: the reference keeps every rule clip needs (F32 position embeddings).
        pair["mmproj"] = tmp / f"ref-{inter['mmproj']['path']}"
        quantize_mmproj(tmp / inter["mmproj"]["path"], pair["mmproj"],
                        MmprojQuantOptions(INTERMEDIATE, progress=False, overwrite=True))
    return inter, pair


def _importance_matrix(model_dir: Path, out_dir: Path, options: QuantizeOptions, preloaded: imx.Imatrix | None,
                       pair: dict[str, Path], log: Callable[[str], None]) -> tuple[imx.Imatrix | None, dict | None]:
    """The imatrix to apply (computed for "auto" and saved as OUT/imatrix.gguf), checked against the pair."""
    im = preloaded
    if options.auto_imatrix:
        log("computing an importance matrix with the reference model"
            + (f" over {options.calibration}" if options.calibration else " over built-in images and prompts"))
        im = compute_imatrix(model_dir, options.calibration,
                             ImatrixOptions(max_samples=options.imatrix_samples, progress=options.progress))
        imx.save(im, out_dir / IMATRIX_FILE)
    if im is None:
        return None, None
    cov = check_imatrix(im, pair)
    return im, {"path": str(im.path), "datasets": list(im.datasets), "chunks": im.chunk_count,
                "coverage": {r: f"{len(c.covered)}/{len(c.covered) + len(c.missing)}" for r, c in cov.items()}}


def _quantize_pair(model_dir: Path, out_dir: Path, tmp: Path, plan: _Plan, pair: dict[str, Path],
                   im: imx.Imatrix | None, options: QuantizeOptions, log: Callable[[str], None]) -> dict[str, Any]:
    """Write the final text and projector files; return the quantizers' reports by role."""
    qt, mq = plan.text_type, plan.mmproj_type
    reports: dict[str, Any] = {}
    text_out = out_dir / plan.names["text"]
    if qt.name == INTERMEDIATE:
        shutil.copyfile(pair["text"], text_out)
    elif qt.is_float:
        convert_checkpoint(model_dir, tmp / "float", qt.name, mmproj_quant=INTERMEDIATE, overwrite=True,
                           progress=options.progress, name=plan.stem)
        os.replace(tmp / "float" / plan.names["text"], text_out)
    else:
        log(f"quantizing the text model to {qt.name}")
        reports["text"] = quantize_text(pair["text"], text_out, TextQuantOptions(
            qt.name, im, options.nthread, progress=options.progress, overwrite=True))
    if "mmproj" in plan.names:
        log(f"quantizing the projector to {mq.name}")
        reports["mmproj"] = quantize_mmproj(pair["mmproj"], out_dir / plan.names["mmproj"], MmprojQuantOptions(
            mq.name, im, options.nthread, progress=options.progress, overwrite=True))
    return reports


def _measure_quality(pair: dict[str, Path], outs: tuple[Path, Path | None], options: QuantizeOptions,
                     log: Callable[[str], None]) -> dict[str, Any]:
    from quant.quality import QualityOptions, evaluate, format_table

    log("measuring quality against the f16 intermediate")
    quality = options.quality or QualityOptions(threads=options.nthread or None)
    q = evaluate((pair["text"], pair.get("mmproj")), outs, quality)
    log("\n" + format_table(q))
    return {**q.to_dict(), "ref": f"{INTERMEDIATE} intermediate", "test": outs[0].name}


def _keep_intermediate(out_dir: Path, plan: _Plan, pair: dict[str, Path], finals: set[Path | None]) -> dict[str, Any]:
    """Move the f16 pair beside the outputs (unless an output is itself the f16 file)."""
    kept = {}
    for role, path in pair.items():
        dest = out_dir / plan.f16_names[role]
        if dest in finals:
            continue
        os.replace(path, dest)
        kept[role] = file_entry(out_dir, dest, INTERMEDIATE)
    return kept


def convert_quantized(model_dir: str | Path, out_dir: str | Path, options: QuantizeOptions) -> dict[str, Any]:
    """Write OUT/<name>-<quant>.gguf, OUT/mmproj-<name>-<mquant>.gguf and OUT/manifest.json; return the manifest."""
    log = _log(options.progress)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    plan = _plan(model_dir, out_dir, options)
    preloaded = imx.load(options.imatrix) if options.imatrix is not None and not options.auto_imatrix else None

    tmp = Path(tempfile.mkdtemp(prefix=".edge-convert-", dir=out_dir))
    try:
        log(f"converting to an f16 intermediate in {tmp}")
        inter, pair = _convert_intermediate(model_dir, tmp, plan.stem, options.progress)
        im, im_info = _importance_matrix(model_dir, out_dir, options, preloaded, pair, log)
        reports = _quantize_pair(model_dir, out_dir, tmp, plan, pair, im, options, log)
        text_out = out_dir / plan.names["text"]
        mm_out = out_dir / plan.names["mmproj"] if "mmproj" in plan.names else None
        manifest: dict[str, Any] = {
            "converter_version": inter.get("converter_version", __version__),
            "architecture": inter.get("architecture"),
            "source": inter.get("source"),
            "text": file_entry(out_dir, text_out, plan.text_type.name),
        }
        if mm_out is not None:
            manifest["mmproj"] = file_entry(out_dir, mm_out, plan.mmproj_type.name)
        manifest["quantization"] = {
            "intermediate": INTERMEDIATE,
            "estimate": plan.estimate.to_dict(),
            **{role: r.to_dict() for role, r in reports.items()},
        }
        if im_info is not None:
            manifest["imatrix"] = im_info
        if options.report:
            manifest["quality"] = _measure_quality(pair, (text_out, mm_out), options, log)
        if options.keep_f16:
            kept = _keep_intermediate(out_dir, plan, pair, {text_out, mm_out})
            if kept:
                manifest["intermediate"] = kept
        write_manifest(out_dir, manifest)
        return read_manifest(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
